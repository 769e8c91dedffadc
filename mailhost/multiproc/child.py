"""One worker process of `[server] workers = N` (see mailhost.multiproc.parent); the main process starts it:

    python -m mailhost.multiproc.child --config PATH --number N --shards S --channel FD --fds ROLE:FD,...

FD numbers are inherited descriptors: --channel the worker's end of the AMP socket
pair, --fds the listening sockets and the role each serves. Worker N delivers
shard N of S of the queue (mailhost.multiproc.shard): the messages it accepts, and those
of its shard already in the spool. Log events go to stdout as JSON lines, for
the main process to write into its log.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.protocols import amp

from mailhost.multiproc.shard import Shard
from mailhost.multiproc.commands import PaceCommand, QueueCommand, WorkerReload, WorkerStart
from mailhost.config import ROLES, Config, ConfigError, load
from mailhost.ops.heap import collect_less_often, settle_heap
from mailhost.ops.logs import BatchedStream, flush_pending, text_lines
from mailhost.ops.metrics import SNAPSHOT_SECONDS, Metrics, snapshots_folder, write_snapshot
from mailhost.ops.reload import ReloadOnHangup
from mailhost.ops.signals import StopOnSignal, stop_reactor
from mailhost.queue.operations import apply_queue_action
from mailhost.queue.spool import SpoolError
from mailhost.service import Outbound, build_inbound, build_outbound, reloader
from mailhost.smtp.server import listener_factory
from mailhost.ops.tls import ServerTLS, tls_pair_paths
from mailhost.smtp.transport import make_eager_server
from mailhost.multiproc.accept import BalancedAccepts, balance
from mailhost.multiproc.loads import SessionLoads
from mailhost.multiproc.lookups import WorkerLookups
from mailhost.delivery.routing import Upstream

log = Logger(namespace="mailhost.worker")


class Worker:
    """Serves the inherited listeners the way the main process does, once it has the TLS pair."""

    def __init__(self, config: Config, number: int, fds: list[tuple[str, int]], reactor: Any, shards: int,
                 loads: SessionLoads, settle: Callable[[], None] | None = None) -> None:
        self.config = config
        # Every process's open sessions (the main process's memory): ours published, theirs read when accepting.
        self.loads = loads
        self.settle = settle  # called once our queue is loaded (mailhost.ops.heap.settle_heap)
        self.number = number
        self.shards = shards
        self.fds = fds
        self.reactor = reactor
        self.top = service.MultiService()
        self.tls: ServerTLS | None = None
        self.reloader: ReloadOnHangup | None = None
        self.ports: list[Any] = []
        self.accepts: list[BalancedAccepts] = []
        self.failed = False
        self.outbound: Outbound | None = None

    def start(self, pem: tuple[bytes, bytes], lookups: Upstream) -> None:
        """Serve; `lookups` answers our routes and DNS records first (the main process)."""
        if self.tls is not None:
            raise RuntimeError("already started")
        self.tls = ServerTLS(*tls_pair_paths(self.config), pem=pem)
        # Its metrics are not served: /metrics is the main process's.
        metrics = Metrics()
        # Ids of our shard for what we accept, and our shard of the queue to deliver.
        inbound = build_inbound(self.config, self.tls, self.reactor, self.top, metrics, Shard(self.number, self.shards))
        self.outbound = build_outbound(self.config, inbound, self.reactor, self.top, metrics, main=False)
        self.outbound.deliverer.router.upstream = lookups
        if self.settle is not None:
            settle = self.settle
            self.outbound.scheduler.ready.addCallback(lambda _: settle())
        # Not a service here: no SIGHUP handler, the main process says when.
        self.reloader = reloader(self.tls, self.reactor, inbound, self.outbound)
        if self.config.metrics.endpoint is not None:
            # The main process serves /metrics: it adds up our snapshots (mailhost.ops.metrics).
            path = snapshots_folder(self.config.server.state_dir) / f"worker{self.number}.json"
            snapshots = TimerService(SNAPSHOT_SECONDS, self._snapshot, metrics, path)
            snapshots.setServiceParent(self.top)
        self.top.startService()
        inbound.context.on_sessions = self.loads.publish
        self.loads.publish(inbound.context.open_sessions)  # accepting from now on: no longer ABSENT
        for role, fd in self.fds:
            factory = listener_factory(role, inbound.context, self.reactor)
            port = self.reactor.adoptStreamPort(fd, _family(fd), factory)
            self.ports.append(port)
            _close(fd)  # adoptStreamPort holds its own copy
            # One connection per wake-up, as the main process: a burst spreads (mailhost.multiproc.accept).
            self.accepts.append(balance(port, factory, self.reactor, self.loads, lambda: inbound.context.open_sessions,
                                        adopted=lambda transport: make_eager_server(transport, flush_pending)))
        log.info("worker {number} listening: {listeners}", number=self.number,
                 listeners=" ".join(f"{role}={_where(port)}" for (role, _), port in zip(self.fds, self.ports)))

    def reload(self, pem: tuple[bytes, bytes]) -> None:
        """What SIGHUP does in the main process, with the TLS pair the main process has."""
        if self.reloader is not None:
            self.reloader.reload(pem)

    def _snapshot(self, metrics: Metrics, path: Any) -> None:
        try:
            write_snapshot(metrics, path)
        except OSError as e:
            log.warn("worker {number}: cannot write its metrics for the main process: {error}", number=self.number,
                     error=str(e))

    async def queue_action(self, action: str, queue_id: str | None) -> int:
        """`mailhost queue ...` for a message of our shard, as the main process does it for its own."""
        if self.outbound is None:
            raise SpoolError("this worker delivers nothing")
        return await apply_queue_action(self.outbound.scheduler, action, queue_id)

    def paces(self) -> dict:
        return self.outbound.throttle.snapshot() if self.outbound is not None else {}

    def stop(self) -> Deferred | None:
        for accepts in self.accepts:
            accepts.stop()  # before the ports close their sockets
        self.accepts = []
        for port in self.ports:
            port.stopListening()
        self.ports = []
        if self.top.running:
            return self.top.stopService()
        return None


class WorkerChannel(amp.AMP):
    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker

    @WorkerStart.responder
    def start(self, cert_pem: bytes, key_pem: bytes) -> dict:
        try:
            self.worker.start((cert_pem, key_pem), WorkerLookups(self))
        except Exception:
            # Not serving is no use: exit, and the main process tries again a little later.
            log.failure("worker {number} cannot start", number=self.worker.number)
            self.worker.failed = True
            self.worker.reactor.callLater(0, stop_reactor, self.worker.reactor)
            raise
        return {}

    @QueueCommand.responder
    def queue_action(self, action: str, queue_id: str | None = None) -> Deferred[dict]:
        return Deferred.fromCoroutine(self.worker.queue_action(action, queue_id)).addCallback(lambda n: {"count": n})

    @PaceCommand.responder
    def pace(self) -> dict:
        return {"json": json.dumps(self.worker.paces())}

    @WorkerReload.responder
    def reload(self, cert_pem: bytes, key_pem: bytes) -> dict:
        self.worker.reload((cert_pem, key_pem))
        return {}

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        # The main process is gone (or let go of us): stop; it starts a new worker if it is still there.
        # (Also when it closes the channel while it stops us: then our stop may be under way already.)
        stop_reactor(self.worker.reactor)


def _where(port: Any) -> str:
    address = port.getHost()
    if hasattr(address, "port"):
        return f"[{address.host}]:{address.port}" if ":" in address.host else f"{address.host}:{address.port}"
    return str(getattr(address, "name", address))


def _family(fd: int) -> int:
    probe = socket.socket(fileno=fd)
    try:
        return probe.family
    finally:
        probe.detach()


def _close(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass


def parse_fds(text: str) -> list[tuple[str, int]]:
    pairs = []
    for item in text.split(","):
        role, _, fd = item.partition(":")
        if role not in ROLES:
            raise ValueError(role)
        pairs.append((role, int(fd)))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailhost.multiproc.child", description="a worker of server.workers (started by the daemon)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--log", choices=("json", "text"), default="json")
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--fds", type=parse_fds, required=True)
    parser.add_argument("--loads", type=int, required=True, help="descriptor of the processes' shared session counts")
    args = parser.parse_args(argv)

    # The main process steers us: SIGTERM stops, SIGHUP's work comes over the channel,
    # and a Ctrl-C meant for the main process must not take us down first.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from twisted.internet import reactor

    if args.log == "text":
        # The main process's own stdout: text lines in its format, written here (mailhost.ops.logs).
        observer = text_lines(sys.stdout, reactor, worker=args.number)
    else:
        # JSON lines to the main process, which logs them its way (--logfile, --logger).
        observer = jsonFileLogObserver(BatchedStream(sys.stdout, reactor))
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    try:
        config = load(args.config)
    except ConfigError as e:
        sys.stderr.write(f"mailhost worker: {e}\n")
        return 1

    collect_less_often()  # mailhost.ops.heap, as in the main process
    try:
        loads = SessionLoads.attach(args.loads, args.shards, args.number)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"mailhost worker: --loads {args.loads}: {e}\n")
        return 1
    worker = Worker(config, args.number, args.fds, reactor, shards=args.shards, loads=loads, settle=settle_heap)
    factory = protocol.Factory.forProtocol(lambda: WorkerChannel(worker))
    factory.noisy = False
    reactor.adoptStreamConnection(args.channel, socket.AF_UNIX, factory)
    _close(args.channel)
    reactor.addSystemEventTrigger("before", "shutdown", worker.stop)
    # SIGTERM comes from the main process, and with systemd's KillMode=control-group from
    # systemd too: the handler must take it twice and never log inside itself (mailhost.ops.signals).
    StopOnSignal(reactor).install_when_running()
    reactor.run(installSignalHandlers=True)
    return 1 if worker.failed else 0


if __name__ == "__main__":
    sys.exit(main())
