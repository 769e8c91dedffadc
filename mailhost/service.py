"""Builds the daemon: one MultiService holding the disk threads and the listeners."""

from __future__ import annotations

import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet import endpoints
from twisted.internet import error as internet_error
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from mailhost.multiproc.shard import EVERYTHING, Shard
from mailhost.local.auth import AuthSlowdown, make_portal
from mailhost.config import Config, ConfigError, load
from mailhost.doors.control import control_service
from mailhost.authn.dkim import DkimKeyError, Signer, configured_keys
from mailhost.ops.logs import default_observer, flush_pending
from mailhost.ops.metrics import Metrics, metrics_site, snapshots_folder
from mailhost.doors.pickup import PickupCollector
from mailhost.ops.durable import DiskWriter
from mailhost.ops.ownership import make_dirs, owner_of
from mailhost.ops.heap import collect_less_often, settle_heap
from mailhost.ops.statelock import AlreadyRunning, StateLock, lock_state_dir
from mailhost.intake.cleanup import Intake
from mailhost.local.mailbox import LocalDomains
from mailhost.delivery.deliverer import Deliverer, SessionPool
from mailhost.delivery.mta_sts import MtaSts, PolicyStore
from mailhost.delivery.tls_policy import TlsPolicies
from mailhost.delivery.tlsrpt import TlsReporter, TlsResults
from mailhost.delivery.routing import Router
from mailhost.delivery.scheduler import Scheduler
from mailhost.ops.reload import ReloadError, ReloadOnHangup, changed_sections
from mailhost.ops.signals import StopOnSignal
from mailhost.smtp.server import ServerContext, listener_factory
from mailhost.queue.operations import PaceReport, QueueOperations
from mailhost.queue.spool import Spool
from mailhost.feedback.complaints import FLUSH_SECONDS as COMPLAINT_FLUSH_SECONDS, ComplaintRate, complaint_rate
from mailhost.feedback.events import event_log
from mailhost.feedback.suppression import SuppressionList
from mailhost.feedback.webhooks import WebhookService, WebhookSetupError, prepare
from mailhost.feedback.unsubscribe import UnsubscribeKeyError, UnsubscribeTokens, daemon_tokens
from mailhost.doors.http.site import https_factory
from mailhost.doors.http.unsubscribe import UnsubscribeResource
from mailhost.doors.http.api.keys import api_keys
from mailhost.doors.http.api.resource import ApiContext, ApiResource
# --- web console (issue 16) ---
from mailhost.doors.http.console.context import ConsoleContext
from mailhost.doors.http.console.resource import ConsoleResource
from mailhost.doors.http.console.sessions import SessionStore
from mailhost.feedback.traffic import FLUSH_SECONDS as TRAFFIC_FLUSH_SECONDS, GroupOf, Traffic, traffic as traffic_figures
from mailhost.delivery.throttle import group_of
from mailhost.feedback.complaints import provider_of
# --- end web console ---
from mailhost.doors.http.mta_sts import well_known
from mailhost.feedback.srs import daemon_srs
from mailhost.ops.keyfile import KeyFileError
from mailhost.delivery.throttle import Throttle, share_of
from mailhost.ops.tls import ServerTLS, TLSSetupError, ensure_tls_pair, tls_pair_paths
from mailhost.smtp.transport import make_eager_server, send_eagerly
from mailhost.multiproc.accept import BalancedAccepts, balance
from mailhost.multiproc.loads import SessionLoads
from mailhost.multiproc.parent import ShardedQueue, WorkerPool, shareable

log = Logger(namespace="mailhost.service")

PICKUP_SCAN_SECONDS = 5.0


class DiskWriterService(service.Service):
    """Runs the disk thread pool for as long as the daemon runs."""

    def __init__(self, writer: DiskWriter) -> None:
        self.writer = writer

    def startService(self) -> None:
        super().startService()
        self.writer.start()

    def stopService(self) -> None:
        super().stopService()
        self.writer.stop()


class ListenerService(service.Service):
    """One listening endpoint; a port that cannot be bound stops the daemon with one line.

    It listens itself (rather than through Twisted's StreamServerEndpointService) so that
    it holds the listening port, for the workers to share: the endpoints mailhost listens
    on (tcp, tcp6, unix, ssl, systemd) bind at once, so listen()'s Deferred has fired by
    the time privilegedStartService returns, before twistd drops privileges."""

    def __init__(self, description: str, factory: Any, reactor: Any,
                 balanced: tuple[SessionLoads, Callable[[], int]] | None = None) -> None:
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.endpoint = endpoints.serverFromString(reactor, description)
        # Shared with workers: accept one connection per wake-up, and leave it to a process with
        # fewer sessions (the loads and our count of sessions), so connections spread (mailhost.multiproc.accept).
        self.balanced = balanced
        self._accepts: BalancedAccepts | None = None
        self._listening: Deferred[Any] | None = None
        self._port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self._listening is None:  # not started by twistd, which calls privilegedStartService first
            self._listen()

    def _listen(self) -> None:
        listening = self.endpoint.listen(self.factory)
        if not listening.called:  # an endpoint that binds later: say so then if it cannot
            self._listening = listening.addCallbacks(self._bound, self._not_bound)
            return
        failed: list[Failure] = []
        listening.addCallbacks(self._bound, failed.append)
        if failed:
            if failed[0].check(internet_error.CannotListenError):
                sys.stderr.write(f"mailhost: cannot listen on {self.description}: {failed[0].value.socketError}\n")
                raise SystemExit(1) from None
            failed[0].raiseException()
        self._listening = listening

    def _not_bound(self, failure: Failure) -> None:
        if not failure.check(CancelledError):  # cancelled by stopService: nothing to say
            log.failure("cannot listen on {endpoint}", failure, endpoint=self.description)

    def _bound(self, port: Any) -> None:
        self._port = port
        # The log has the line about a reply before the client has the reply (mailhost.ops.logs).
        send_eagerly(port, before_write=flush_pending)
        if self.balanced is not None:
            loads, sessions = self.balanced
            self._accepts = balance(port, self.factory, self.reactor, loads, sessions,
                                    adopted=lambda transport: make_eager_server(transport, flush_pending))

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._accepts is not None:
            self._accepts.stop()  # before the port closes the socket
            self._accepts = None
        port, listening = self._port, self._listening
        self._port = self._listening = None
        if port is not None:
            return maybeDeferred(port.stopListening)
        if listening is not None:
            listening.cancel()
        return None

    def port(self) -> Any:
        """The listening port, once bound (None before, and after stopService)."""
        return self._port


class MailhostDaemon(service.MultiService):
    """The whole daemon. Attached to twistd's application, it names the log
    observer twistd starts (mailhost.ops.logs.default_observer), if it has one."""

    log_observer: ILogObserver | None = None
    workers: WorkerPool | None = None
    ready: Deferred[None]  # the queue is loaded
    state_lock: StateLock | None = None  # held for the daemon's life

    def startService(self) -> None:
        if self.state_lock is not None:
            self.state_lock.write_pid()  # twistd without -n forked after the lock was taken
        super().startService()

    def setServiceParent(self, parent: Any) -> Any:
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)


def make_service(config_path: str, reactor: Any = None, twistd_options: Any = None) -> service.MultiService:
    """The whole daemon for the configuration at `config_path`.

    A user mistake (config, TLS or DKIM key files) exits with one line on stderr, status 1.
    """
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = load(config_path)
        config.server.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Before anything touches the spool: a second daemon would take the first's writes in
        # progress (spool/tmp) for debris.
        state_lock = lock_state_dir(config.server.state_dir, owner_of(config.server.state_dir))
        check_permissions(config)
        tls_options = ServerTLS(*ensure_tls_pair(config))
        daemon = build(config, tls_options, reactor)
        # The collector set for a daemon's heap (mailhost.ops.heap); each worker does the same.
        collect_less_often()
        daemon.ready.addCallback(lambda _: settle_heap())
        daemon.state_lock = state_lock
        daemon.log_observer = default_observer(twistd_options, reactor)
        if daemon.workers is not None and daemon.log_observer is not None:
            daemon.workers.share_stdout = True
        # twistd runs the reactor with Twisted's SIGTERM/SIGINT handlers, which log from inside
        # the signal handler and could deadlock on the log's lock: ours replace them.
        StopOnSignal(reactor).install_when_running()
        return daemon
    except (ConfigError, TLSSetupError, DkimKeyError, AlreadyRunning, WebhookSetupError, UnsubscribeKeyError,
            KeyFileError) as e:
        sys.stderr.write(f"mailhost: {e}\n")
        raise SystemExit(1) from None
    except OSError as e:
        sys.stderr.write(f"mailhost: {e.filename}: {e.strerror}\n")
        raise SystemExit(1) from None


def check_permissions(config: Config) -> None:
    """Refuse to run on state anyone could rewrite: users files, the spool, state_dir."""
    paths = [config.server.state_dir, config.server.state_dir / "spool", *{d.users for d in config.domains}]
    for path in paths:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & stat.S_IWOTH:
            raise ConfigError(f"{path} is world-writable; refusing to run (chmod o-w {path})")


@dataclass
class Inbound:
    """What takes mail in: the daemon builds one, and so can another process serving its listeners."""

    writer: DiskWriter
    domains: LocalDomains
    spool: Spool
    intake: Intake  # its on_queued is the caller's to set
    suppression: SuppressionList
    context: ServerContext
    unsubscribe: UnsubscribeTokens
    traffic: Traffic | None = None  # the web console's per-minute figures


def build_inbound(config: Config, tls_options: ServerTLS, reactor: Any, parent: service.MultiService,
                  metrics: Metrics, shard: Shard) -> Inbound:
    """The disk threads, local domains, the spool's intake, AUTH, and the context every
    SMTP session reads. The thread pools run as services under `parent`."""
    # Background threads (SCHED_BATCH): a commit woken does not take the core from the reactor
    # (bench/outbound.py's drain +14% for the queue runner's; inbound 20 sessions +8-10% for this one).
    writer = DiskWriter(reactor, background=True)
    DiskWriterService(writer).setServiceParent(parent)
    domains = LocalDomains(config)
    spool = Spool(config.server.state_dir / "spool")
    # Password checks get their own two threads: scrypt is CPU- and memory-hard
    # (32 MiB each), and a flood of AUTH attempts must not hold up the disk. hashlib's
    # scrypt releases the GIL, so two run on two cores; a burst with one credential
    # costs one check anyway (mailhost.local.verified), and each worker has its own two.
    checks = DiskWriter(reactor, threads=2, name="mailhost-auth")
    DiskWriterService(checks).setServiceParent(parent)
    slowdown = AuthSlowdown(reactor, free=config.limits.auth_failures)
    # DNS for SPF/DKIM/DMARC runs here. DKIM signing runs on the disk thread that commits the
    # message (one thread trip a message; the RSA step is OpenSSL's, which releases the GIL).
    content_threads = DiskWriter(reactor, threads=4, name="mailhost-content")
    DiskWriterService(content_threads).setServiceParent(parent)
    events = event_log(config.server.state_dir)
    suppression = SuppressionList(config.server.state_dir / "suppression.json", soft_limit=config.bounces.soft_limit,
                                  soft_window=config.bounces.soft_window, events=events, rules=config.bounce_rules)
    signer = Signer(config.server.state_dir, configured_keys(config.dkim))
    unsubscribe = daemon_tokens(config.server.state_dir)  # made by the main process, before any worker
    complaints = complaint_rate(config.server.state_dir, owner_of(config.server.state_dir))
    # Every process adds its counts to the shared figures every few seconds (feedback.complaints).
    TimerService(COMPLAINT_FLUSH_SECONDS, _flush_complaints, writer, complaints).setServiceParent(parent)
    # The web console's per-minute figures: counted where messages are committed (intake) and
    # where delivery events are written (the event log), added to state_dir/traffic.json by every process.
    traffic = traffic_figures(config.server.state_dir, destination_group(lambda: context.config),
                              owner_of(config.server.state_dir))
    events.observers.append(traffic.count_events)
    TrafficService(writer, traffic).setServiceParent(parent)
    srs = daemon_srs(config.server.state_dir, config.srs.max_age_days)  # like the unsubscribe key: made once
    intake = Intake(config, writer, spool, domains, signer, suppression, content_threads.run, shard,
                    unsubscribe=unsubscribe, complaint_rate=complaints, traffic=traffic, srs=srs)
    portal = make_portal(domains, checks.run, reactor)
    context = ServerContext(config, domains, intake, tls_options, portal, slowdown, metrics,
                            process=shard.index if shard.count > 1 else None)
    inbound = Inbound(writer, domains, spool, intake, suppression, context, unsubscribe, traffic)
    return inbound


class TrafficService(TimerService):
    """Adds this process's traffic counts to state_dir/traffic.json every minute (on a disk
    thread), and once more when the daemon stops, so a restart loses none."""

    def __init__(self, writer: DiskWriter, traffic: Traffic) -> None:
        super().__init__(TRAFFIC_FLUSH_SECONDS, self._flush)
        self.writer = writer
        self.traffic = traffic

    def _flush(self) -> Deferred[Any]:
        return self.writer.run(self.traffic.flush).addErrback(
            lambda failure: log.failure("cannot update the traffic figures", failure))

    def stopService(self) -> Deferred[Any] | None:
        stopped = super().stopService()
        try:
            self.traffic.flush()  # the disk threads may be stopping: a small file, written here
        except OSError as e:
            log.error("cannot update the traffic figures: {error}", error=e)
        return stopped


def destination_group(config_of: Any) -> GroupOf:
    """The destination group of a delivery event, as the throttle names it: the [[throttle]]
    rule matching the MX host that answered (google, microsoft, ...), else the MX's parent
    domain; with no host name (an address literal, or nothing reached), the recipient's provider."""

    def group(recipient: str, remote_mta: str) -> str:
        host = remote_mta.strip().lower().rstrip(".")
        if host and not host.replace(".", "").isdigit() and ":" not in host:
            return group_of(host, config_of().throttles)[0]
        return provider_of(recipient)

    return group


def _flush_complaints(writer: DiskWriter, complaints: ComplaintRate) -> Deferred[Any]:
    return writer.run(complaints.flush).addErrback(
        lambda failure: log.failure("cannot update the complaint figures", failure))


@dataclass
class Outbound:
    """What delivers one process's shard of the queue (all of it, without workers)."""

    scheduler: Scheduler
    throttle: Throttle
    deliverer: Deliverer


def build_outbound(config: Config, inbound: Inbound, reactor: Any, parent: service.MultiService, metrics: Metrics,
                   main: bool) -> Outbound:
    """Routing, pooled connections, pacing and the queue runner. With N delivering
    processes, each keeps its part of the concurrency, of every pace and of its
    connections (the intake's shard says which part)."""
    shard = inbound.intake.shard
    router = Router(config.relay, config.server.hostname, listening_addresses(config))
    pool = SessionPool(reactor, config.server.hostname)
    throttle = Throttle(config.throttles, default_connections=config.queue.per_destination, share=shard.count,
                        index=shard.index)
    metrics.watch_throttle(throttle.snapshot)
    deliverer = Deliverer(config, router, pool, throttle, reactor, metrics,
                          outbound_tls(config, inbound, router, reactor, parent, shard.index, main))
    # The queue runner's disk work (loading due messages, the delivery events, removals) has
    # threads of its own: a draining queue keeps them busy, and a message arriving meanwhile
    # must not wait behind that work for its commit and its 250.
    # Few threads: each one wanting the interpreter lock back after every read, unlink and
    # fsync makes the reactor wait for it, and on a busy machine for the kernel to run it.
    # One writer and one loader drained bench/outbound.py's queue ~10% faster than two and one,
    # which were 12% faster than four and two; also when every attempt was deferred (an
    # envelope fsync'd each). Loads on the writer's thread too: 5-50% slower (bench/README.md).
    # Background threads, as the intake's (build_inbound).
    queue_writer = DiskWriter(reactor, threads=1, name="mailhost-queue", background=True)
    DiskWriterService(queue_writer).setServiceParent(parent)
    queue_loader = DiskWriter(reactor, threads=1, name="mailhost-queue-load", background=True)
    DiskWriterService(queue_loader).setServiceParent(parent)
    scheduler = Scheduler(config, inbound.spool, queue_writer, deliverer, inbound.intake, reactor, metrics, shard,
                          inbound.suppression, max_in_flight=share_of(config.queue.concurrency, shard.count, shard.index),
                          recover_spool=main, loader=queue_loader)
    inbound.intake.on_queued = scheduler.queued
    scheduler.setServiceParent(parent)
    return Outbound(scheduler, throttle, deliverer)


# --- MTA-STS, DANE, TLS-RPT (outbound) ---
def outbound_tls(config: Config, inbound: Inbound, router: Router, reactor: Any, parent: service.MultiService,
                 process: int, main: bool) -> TlsPolicies:
    """The TLS policies for MX delivery: MTA-STS policies cached in state_dir/mta-sts (every
    process fetches on its own miss), TLS-RPT counts in state_dir/tlsrpt (a file per process,
    written every TLS_FLUSH_SECONDS and at stop), and in the main process the reporter that
    sends each ended period's reports through the intake (Intake.notify, as our DSNs)."""
    state = config.server.state_dir
    mta_sts = MtaSts(PolicyStore(state / "mta-sts"), router, reactor, config.relay.ca_file, config.relay.mta_sts_port)
    interval = config.relay.tls_report_interval
    flush_every = min(TLS_FLUSH_SECONDS, interval)
    results = TlsResults(state / "tlsrpt", process, interval)
    TlsResultsService(results, flush_every, inbound.writer.run).setServiceParent(parent)
    if main:
        reporter = TlsReporter(state / "tlsrpt", router, inbound.intake.notify, config.server.hostname, interval,
                               grace=flush_every + 1, run_blocking=inbound.writer.run)
        TimerService(min(3600.0, interval), reporter.run).setServiceParent(parent)
        TimerService(86400.0, inbound.writer.run, mta_sts.store.forget_expired).setServiceParent(parent)
    return TlsPolicies(config.relay, router, mta_sts, results)


TLS_FLUSH_SECONDS = 60.0


class TlsResultsService(TimerService):
    """Writes the TLS-RPT counts every `every` seconds, and once more at stop."""

    def __init__(self, results: TlsResults, every: float, run: Any) -> None:
        super().__init__(every, self._flush)
        self.results = results
        self._run = run  # the disk threads

    def _flush(self) -> Deferred[None]:
        return self._run(self.results.flush).addErrback(
            lambda failure: log.failure("cannot write the TLS-RPT counts", failure))

    def stopService(self) -> Deferred[None] | None:
        stopped = super().stopService()
        try:
            self.results.flush()  # small, and the reactor is stopping anyway
        except OSError as e:
            log.error("cannot write the TLS-RPT counts: {error}", error=e)
        return stopped
# --- end MTA-STS, DANE, TLS-RPT ---


def build(config: Config, tls_options: ServerTLS, reactor: Any) -> MailhostDaemon:
    top = MailhostDaemon()
    metrics = Metrics()
    # With workers, every process delivers its own shard of the queue (mailhost.multiproc.shard); this is shard 0.
    inbound = build_inbound(config, tls_options, reactor, top, metrics, Shard(0, config.server.workers))
    writer, domains, intake = inbound.writer, inbound.domains, inbound.intake
    outbound = build_outbound(config, inbound, reactor, top, metrics, main=True)
    scheduler, throttle = outbound.scheduler, outbound.throttle
    top.ready = scheduler.ready
    pickup = PickupCollector(config.server.state_dir, writer, intake, config.server.hostname)
    # Collect at start and every few seconds, for messages dropped while no daemon answered the poke.
    TimerService(PICKUP_SCAN_SECONDS, pickup.collect).setServiceParent(top)
    loads = None
    if config.server.workers > 1:
        # Every process's count of open sessions, for the shared listeners' accepting (mailhost.multiproc.loads).
        loads = SessionLoads.create(config.server.workers)
        inbound.context.on_sessions = loads.publish
    listeners = []
    for listener in config.listeners:
        factory = listener_factory(listener.role, inbound.context, reactor)
        balanced = None
        if loads is not None and shareable(listener.endpoint):
            balanced = (loads, lambda: inbound.context.open_sessions)
        listeners.append(ListenerService(listener.endpoint, factory, reactor, balanced=balanced))
    # Webhooks post from the main process only: the event log is shared by every process.
    webhooks = WebhookService(inbound.suppression.events or event_log(config.server.state_dir),
                              prepare(config.webhooks), writer.run, reactor)
    webhooks.setServiceParent(top)
    reload = reloader(tls_options, reactor, inbound, outbound, webhooks)
    queue: QueueOperations = scheduler
    paces: PaceReport = throttle
    if config.server.workers > 1:
        assert loads is not None
        workers = WorkerPool(config, lambda: [(i, l.port()) for i, l in enumerate(listeners) if l.port() is not None],
                             tls_options, scheduler.ready, scheduler.adopt_strays, reactor, loads,
                             outbound.deliverer.router, alone=lambda: _deliver_alone(outbound))
        # Queue commands and paces reach the process that holds the message.
        queue = paces = ShardedQueue(scheduler, throttle, workers, lambda: scheduler.shard)
    owner = owner_of(config.server.state_dir)  # what is made before twistd's --uid is given to state_dir's owner
    control_service(config.server.state_dir, queue, pickup, paces, owner).setServiceParent(top)
    if config.metrics.endpoint is not None:
        folder = None
        if config.server.workers > 1:
            folder = snapshots_folder(config.server.state_dir)
            make_dirs(folder, 0o700, owner)  # made as root; the workers write it
            for old in folder.glob("worker*.json"):  # from an earlier run: not this one's workers
                old.unlink(missing_ok=True)
        metrics.watch_complaints(lambda: {p: (r.rate, r.total_complaints)
                                          for p, r in intake.complaint_rate.rates().items()})
        site = metrics_site(metrics, ready=lambda: scheduler.ready.called, workers_folder=folder)
        ListenerService(config.metrics.endpoint, site, reactor).setServiceParent(top)
    if config.http.endpoint is not None:
        # The main process only, also with workers: nothing here is busy enough to share.
        console = ConsoleContext(inbound.context.portal, domains, inbound.context.slowdown, inbound.spool, queue, paces,
                                 inbound.suppression, inbound.suppression.events, inbound.traffic, intake.complaint_rate,
                                 writer.run, reactor, SessionStore(reactor))
        factory = https_factory(http_resources(inbound, reactor, console), tls_options, reactor)
        ListenerService(config.http.endpoint, factory, reactor).setServiceParent(top)
    for each in listeners:
        each.setServiceParent(top)
    reload.setServiceParent(top)
    if config.server.workers > 1:
        workers.setServiceParent(top)
        reload.after.append(workers.reload)
        top.workers = workers
    log.info(
        "mailhost starting: hostname={hostname} domains={domains} listeners={listeners} workers={workers}",
        hostname=config.server.hostname,
        domains=",".join(d.name for d in config.domains),
        listeners=" ".join([f"{l.role}={l.endpoint}" for l in config.listeners]
                           + ([f"https={config.http.endpoint}"] if config.http.endpoint else [])),
        workers=config.server.workers,
    )
    return top


def http_resources(inbound: Inbound, reactor: Any, console: ConsoleContext | None = None) -> dict[bytes, Any]:
    """What the `[http] endpoint` serves, by first path segment (the site adds TLS,
    the security headers and the limits to each)."""
    # --- the HTTP API (/api/v1, mailhost.doors.http.api): in the main process, which alone serves
    # [http]; it reads the spool and event log every process writes, and takes mail in by its intake.
    state_dir = inbound.context.config.server.state_dir
    api = ApiResource(ApiContext(lambda: inbound.context.config, api_keys(state_dir), inbound.intake, inbound.spool,
                                 inbound.suppression, inbound.suppression.events, inbound.writer.run, reactor))
    resources: dict[bytes, Any] = {b"unsubscribe": UnsubscribeResource(inbound.unsubscribe, inbound.suppression,
                                                                       inbound.writer.run),
                                   b"api": api,
                                   b".well-known": well_known(lambda: inbound.context.config)}  # MTA-STS policy (RFC 8461 3.3)
    if console is not None:
        resources[b"console"] = ConsoleResource(console)  # the web console (login required)
    return resources


def reloader(tls: ServerTLS, reactor: Any, inbound: Inbound, outbound: Outbound,
             webhooks: WebhookService | None = None) -> ReloadOnHangup:
    """SIGHUP for one process: every component whose settings changed is rebuilt."""
    context = inbound.context

    def apply(config: Config) -> list[str]:
        running = context.config
        changed = changed_sections(running, config, (
            "server.hostname", "limits", "domains", "submission", "inbound", "bounces", "bounce_rules", "dkim", "relay",
            "queue", "throttles", "server.tls_cert", "server.tls_key", "webhooks", "http.public_url", "unsubscribe", "mta_sts", "srs"))
        # Build what can fail first, so that a bad key changes nothing.
        try:
            signer = Signer(config.server.state_dir, configured_keys(config.dkim)) if "dkim" in changed else None
            hooks = prepare(config.webhooks) if webhooks is not None else []  # secrets may change in place
        except (DkimKeyError, WebhookSetupError) as e:
            raise ReloadError(str(e)) from None
        inbound.domains.replace(config)
        context.config = config  # limits, hostname: read by each new session
        inbound.intake.reconfigure(config, signer)
        if inbound.intake.srs is not None:
            inbound.intake.srs.max_age_days = config.srs.max_age_days
        inbound.suppression.soft_limit = config.bounces.soft_limit
        inbound.suppression.soft_window = config.bounces.soft_window
        inbound.suppression.rules = config.bounce_rules  # the deliverer reads its config's on each reply
        tls.cert_path, tls.key_path = tls_pair_paths(config)
        if outbound is not None:
            if "relay" in changed or "server.hostname" in changed:
                outbound.deliverer.router.configure(config.relay, config.server.hostname, listening_addresses(config))
            outbound.deliverer.reconfigure(config)
            if "throttles" in changed or running.queue.per_destination != config.queue.per_destination:
                outbound.throttle.reconfigure(config.throttles, config.queue.per_destination)
            shard = outbound.scheduler.shard
            outbound.scheduler.config = config
            outbound.scheduler.max_in_flight = share_of(config.queue.concurrency, shard.count, shard.index)
        if webhooks is not None:
            webhooks.reconfigure(hooks)
        return changed

    return ReloadOnHangup(tls, reactor, lambda: context.config, apply, inbound.domains.reload_users)


def _deliver_alone(outbound: Outbound) -> None:
    """No worker could be started: this process delivers every shard."""
    outbound.scheduler.shard = EVERYTHING
    outbound.throttle.deliver_alone()
    outbound.scheduler.max_in_flight = outbound.scheduler.config.queue.concurrency
    outbound.scheduler.adopt_strays().addErrback(lambda failure: log.failure("taking over the queue", failure))


def listening_addresses(config: Config) -> set[tuple[str, int]]:
    """(address, port) of every TCP listener, "0.0.0.0"/"::" for a wildcard: to spot an MX that is us."""
    found = set()
    for listener in config.listeners:
        kind, _, rest = listener.endpoint.partition(":")
        if kind not in ("tcp", "tcp6", "ssl"):
            continue
        fields = rest.replace("\\:", "\0").split(":")
        options = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
        port = options.get("port", fields[0] if fields and "=" not in fields[0] else "")
        default = "::" if kind == "tcp6" else "0.0.0.0"
        if port.isdigit():
            found.add((options.get("interface", default).replace("\0", ":"), int(port)))
    return found
