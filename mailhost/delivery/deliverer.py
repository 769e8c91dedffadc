"""Delivering one queued message to its remote recipients: route each domain,
try its hops in order over pooled connections, and return one result per
recipient. The scheduler decides what the results mean for the queue."""

from __future__ import annotations

import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mailhost.config import Config, SmartHostConfig
from mailhost.queue.envelope import Envelope, Recipient
from mailhost.delivery.routing import Hop, RouteError, Router
from mailhost.smtp.client import ClientSession, DSNParameters, SendResult, SessionError, TlsFailure, open_session
from mailhost.smtp.wire import Reply
from mailhost.feedback.classify import BLOCKING, RATE_LIMIT, classify_reply
from mailhost.feedback.suppression import verp_sender
from mailhost.feedback.srs import is_srs
from mailhost.delivery.throttle import Pace, Throttle, is_slow_down_signal
from mailhost.delivery.mta_sts import PolicyResult
from mailhost.delivery.tls_policy import TLS_STATUS, HopTls, TlsPolicies
from mailhost.ops.metrics import Metrics

log = Logger(namespace="mailhost.outbound")

IDLE_REUSE_SECONDS = 5.0  # keep a finished connection this long for the next message to the same host
SWEEP_SECONDS = 1.0  # how often connections idle for longer are closed


THROTTLE_WAIT_MAX = 2.0  # seconds; a later send slot puts the message back in the queue instead


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient in one delivery attempt."""

    state: str  # "delivered" | "deferred" | "failed" | "throttled" (not tried: over the pace)
    reply: str  # the remote reply or our own reason
    status: str  # enhanced status code
    remote_mta: str = ""
    relay: str = ""  # host[ip]:port, for the log
    retry_in: float = 0.0  # for "throttled": seconds until the group's next send slot
    tls: str = ""  # the TLS version of the session that answered ("TLSv1.3"), "" for none
    category: str = ""  # the bounce class of a remote refusal (feedback.classify), "" otherwise
    dsn_passed: bool = False  # the next hop offered DSN and got the RFC 3461 parameters


def log_outcome(queue_id: str, recipient: str, outcome: Outcome, delay: float) -> None:
    """The one line per recipient per attempt (MX or smart host, reply or failure alike), the
    way Postfix writes it: what a script greps for to learn what happened to the mail for bob@x."""
    log.info("{id}: to=<{rcpt}> relay={relay} tls={tls} delay={delay:.2f} dsn={status} status={state} ({reply})",
             id=queue_id, rcpt=recipient, relay=outcome.relay or "none", tls=outcome.tls or "none", delay=delay,
             status=outcome.status, state=outcome.state, reply=outcome.reply)


def recipient_domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


class SessionPool:
    """Open SMTP sessions by (host, address, port), reused for later messages to the same place.

    A session given back waits IDLE_REUSE_SECONDS for the next message; one
    sweep a second closes those that waited longer (no timer per message)."""

    def __init__(self, reactor: Any, helo: str) -> None:
        self._reactor = reactor
        self._helo = helo
        self._idle: dict[tuple[str, str, int, str], list[tuple[ClientSession, float]]] = defaultdict(list)
        self._sweep: Any = None

    def take(self, hop: Hop, address: str, tls: str, trust_root: Any, auth: tuple[str, str] | None,
             hop_tls: HopTls | None = None) -> Deferred[ClientSession]:
        """An idle session to the same place opened under the same TLS policy, or a new one."""
        idle = self._idle.get((hop.host, address, hop.port, hop_tls.pool_key if hop_tls else ""))
        while idle:
            session, _ = idle.pop()
            if session.usable:
                return succeed(session)
            session.abort()
        return open_session(
            self._reactor, host=hop.host, address=address, port=hop.port, helo=self._helo,
            tls=tls, trust_root=trust_root, auth=auth,
            peer_check=hop_tls.check if hop_tls else None, enforce_check=hop_tls.enforce if hop_tls else False,
        )

    def give_back(self, hop: Hop, address: str, session: ClientSession, hop_tls: HopTls | None = None) -> None:
        if not session.usable:
            session.abort()
            return
        key = (hop.host, address, hop.port, hop_tls.pool_key if hop_tls else "")
        self._idle[key].append((session, self._reactor.seconds() + IDLE_REUSE_SECONDS))
        if self._sweep is None or not self._sweep.active():
            self._sweep = self._reactor.callLater(SWEEP_SECONDS, self._expire)

    def _expire(self) -> None:
        now = self._reactor.seconds()
        for key in list(self._idle):
            keep = []
            for session, until in self._idle[key]:
                if until <= now or not session.usable:
                    session.quit()
                else:
                    keep.append((session, until))
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._sweep = self._reactor.callLater(SWEEP_SECONDS, self._expire)

    def close_all(self) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        for sessions in self._idle.values():
            for session, _ in sessions:
                session.quit()
        self._idle.clear()


class _Slot:
    """One delivery's place among its group's connections (Pace.connections), released once."""

    def __init__(self, semaphore: DeferredSemaphore) -> None:
        self._semaphore = semaphore
        self.held = False

    def acquire(self) -> Deferred[None]:
        def taken(_: object) -> None:
            self.held = True

        return self._semaphore.acquire().addCallback(taken)

    def release(self) -> None:
        if self.held:
            self.held = False
            self._semaphore.release()


class Deliverer:
    """Delivers a message's pending remote recipients, domain by domain, in parallel."""

    def __init__(self, config: Config, router: Router, pool: SessionPool, throttle: Throttle, reactor: Any,
                 metrics: Metrics | None = None, tls_policies: TlsPolicies | None = None) -> None:
        self.config = config
        self.tls_policies = tls_policies  # MTA-STS, DANE, TLS-RPT for MX delivery (None: relay.tls only)
        self._counted: weakref.WeakSet[ClientSession] = weakref.WeakSet()  # sessions TLS-RPT has counted
        self.metrics = metrics
        self.router = router
        self.pool = pool
        self.throttle = throttle
        self.reactor = reactor
        self._local_domains = {d.name for d in config.domains}
        self._smarthost_secrets: dict[int, tuple[str, str] | None] = {}
        self._trust_roots: dict[int, Any] = {}

    def reconfigure(self, config: Config) -> None:
        """New [relay] settings or domains (SIGHUP): the next attempt uses them."""
        self.config = config
        self._local_domains = {d.name for d in config.domains}
        self._smarthost_secrets.clear()
        self._trust_roots.clear()
        if self.tls_policies is not None:
            self.tls_policies.reconfigure(config.relay)

    def deliver(self, envelope: Envelope, message: bytes,
                recipients: list[Recipient] | None = None) -> Deferred[dict[str, Outcome]]:
        """One attempt for `recipients` (default: every pending one of the envelope)."""
        by_domain: dict[str, list[Recipient]] = defaultdict(list)
        for recipient in envelope.pending() if recipients is None else recipients:
            by_domain[recipient_domain(recipient.address)].append(recipient)
        if len(by_domain) == 1:  # the usual case: no DeferredList to merge one result
            [(domain, rcpts)] = by_domain.items()
            return Deferred.fromCoroutine(self._deliver_domain(envelope, message, domain, rcpts))
        jobs = [Deferred.fromCoroutine(self._deliver_domain(envelope, message, domain, rcpts))
                for domain, rcpts in by_domain.items()]

        def merge(results: list[tuple[bool, dict[str, Outcome]]]) -> dict[str, Outcome]:
            merged: dict[str, Outcome] = {}
            for _, outcomes in results:
                merged.update(outcomes)
            return merged

        return DeferredList(jobs, consumeErrors=False).addCallback(merge)

    async def _deliver_domain(self, envelope: Envelope, message: bytes, domain: str,
                              recipients: list[Recipient]) -> dict[str, Outcome]:
        # _deliver_domain and _try_hops are coroutines, _try_hops awaited directly: when the
        # server's reply fires its Deferred, the whole chain resumes in one step (inlineCallbacks
        # generators took a turn of the Deferred machinery each).
        addresses = [r.address for r in recipients]
        started = time.monotonic()
        try:
            route = await self.router.route(domain)
        except RouteError as e:
            state = "failed" if e.permanent else "deferred"
            return self._logged(envelope, {a: Outcome(state, e.text, e.status) for a in addresses}, started)
        except Exception as e:  # a resolver failure we did not foresee: retry later
            log.failure("routing {domain} failed", domain=domain)
            return self._logged(envelope, {a: Outcome("deferred", f"routing failed: {e}", "4.4.3") for a in addresses},
                                started)
        smarthost = bool(route.hops) and route.hops[0].smarthost is not None
        sts = PolicyResult(None)
        if not smarthost and self.tls_policies is not None:
            # Before the pace and the connection slot: a policy fetch may take seconds.
            sts = await self.tls_policies.for_domain(domain)
        pace = self.throttle.pace_for(route.hops[0].host if route.hops else domain)
        wait = pace.reserve()
        if wait > THROTTLE_WAIT_MAX:
            pace.give_back()
            text = f"over the pace for {pace.name} ({pace.rate:.0f}/min)"
            return {a: Outcome("throttled", text, "4.7.0", retry_in=wait) for a in addresses}
        if wait > 0:
            await deferLater(self.reactor, wait, lambda: None)
        slot = _Slot(pace.connections)
        await slot.acquire()
        paused = pace.paused_for()
        if paused > THROTTLE_WAIT_MAX:  # blocked while this delivery waited for a connection
            slot.release()
            return {a: Outcome("throttled", f"{pace.name} paused after a block", "4.7.0", retry_in=paused)
                    for a in addresses}
        try:
            outcomes = await self._try_hops(envelope, message, route.hops, addresses, smarthost, pace, slot, domain, sts)
        finally:
            slot.release()
        return outcomes

    def _logged(self, envelope: Envelope, outcomes: dict[str, Outcome], started: float) -> dict[str, Outcome]:
        delay = time.monotonic() - started
        for rcpt, outcome in outcomes.items():
            log_outcome(envelope.id, rcpt, outcome, delay)
        return outcomes

    async def _try_hops(self, envelope: Envelope, message: bytes, hops: tuple[Hop, ...], addresses: list[str],
                        smarthost: bool, pace: Pace, slot: _Slot, domain: str = "",
                        sts: PolicyResult = PolicyResult(None)) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        remaining = list(addresses)
        last_error = Outcome("deferred", "no server could be reached", "4.4.1")
        attempt_started = time.monotonic()
        policies = self.tls_policies
        for hop in hops:
            hop_tls: HopTls | None = None
            if policies is not None and not smarthost and remaining:
                hop_tls = await policies.for_hop(domain, sts, hop)
                if hop_tls.refusal:
                    log.info("{id}: {reason}", id=envelope.id, reason=hop_tls.refusal)
                    if hop_tls.refusal_type:
                        policies.record(hop_tls.report, TlsFailure(hop_tls.refusal_type, hop_tls.refusal), hop.host)
                    last_error = Outcome("deferred", hop_tls.refusal, TLS_STATUS, hop.host, category="tls")
                    continue
            for address in hop.addresses:
                if not remaining:
                    return outcomes
                if not slot.held:  # handed over with a connection whose final reply then failed
                    await slot.acquire()
                relay = f"{hop.host}[{address}]:{hop.port}"
                started = time.monotonic()
                try:
                    tls_mode, trust = self._tls_for(hop) if hop_tls is None else (hop_tls.tls, None)
                    session = await self.pool.take(hop, address, tls_mode, trust, self._auth_for(hop.smarthost), hop_tls)
                except SessionError as e:
                    last_error = self._session_failure(e, hop, relay, smarthost, e.tls_version or "")
                    if hop_tls is not None and e.tls_failure is not None and policies is not None:
                        # A TLS failure counts; a refused connection or a timeout is no TLS session.
                        policies.record(hop_tls.report, e.tls_failure, hop.host, address)
                    if hop_tls is not None and hop_tls.enforce and e.tls_failure is not None:
                        last_error = Outcome("deferred", f"{hop_tls.label}: {e.reason}", TLS_STATUS, hop.host, relay,
                                             category="tls")
                    log.info("{id}: {relay}: {reason}", id=envelope.id, relay=relay, reason=e.reason)
                    self._react(envelope, pace, hop, e.reply, e.refused)
                    if last_error.state == "failed":
                        return {**outcomes, **self._logged(envelope, {a: last_error for a in remaining}, attempt_started)}
                    continue
                tls = session.tls_version or ""
                if hop_tls is not None and hop_tls.report is not None and session not in self._counted:
                    self._counted.add(session)  # one count per session (RFC 8460 4.4), not per message
                    if policies is not None:
                        policies.record(hop_tls.report, session.tls_failure, hop.host, address)
                    if session.tls_failure is not None:
                        log.info("{id}: {relay}: {label}: {detail} ({type}); delivering anyway (testing)",
                                 id=envelope.id, relay=relay, label=hop_tls.label, detail=session.tls_failure.detail,
                                 type=session.tls_failure.result_type)
                handed_over = []

                def hand_over(hop: Hop = hop, address: str = address, session: ClientSession = session,
                              hop_tls: HopTls | None = hop_tls) -> None:
                    # Our body is written: the connection and our connection slot go to the next
                    # message now, so its commands share the send with our end of data.
                    handed_over.append(True)
                    self.pool.give_back(hop, address, session, hop_tls)
                    slot.release()

                try:
                    result = await self._send(session, envelope, remaining, message, hand_over)
                except SessionError as e:
                    session.abort()  # (broken for whoever took it over too)
                    last_error = self._session_failure(e, hop, relay, smarthost, tls)
                    log.info("{id}: {relay}: {reason}", id=envelope.id, relay=relay, reason=e.reason)
                    self._react(envelope, pace, hop, e.reply, e.refused)
                    continue
                if not handed_over:
                    self.pool.give_back(hop, address, session, hop_tls)
                delay = time.monotonic() - started
                retry_here: list[str] = []
                for rcpt in remaining:
                    reply: Reply = result.replies[rcpt]
                    category = self._react(envelope, pace, hop, reply, False) if reply.code >= 400 else ""
                    outcome = _from_reply(reply, hop.host, relay, tls, category, result.dsn)
                    if outcome.state == "deferred" and smarthost and _has_next(hops, hop):
                        # A smart host's 4xx sends the recipient on to the backup. Its line says
                        # so; the recipient's status= line is the attempt's last answer, as for an MX.
                        log.info("{id}: to=<{rcpt}> relay={relay} tls={tls} dsn={status} ({reply}); "
                                 "trying the next smart host", id=envelope.id, rcpt=rcpt, relay=relay,
                                 tls=tls or "none", status=outcome.status, reply=outcome.reply)
                        retry_here.append(rcpt)
                        last_error = outcome
                        continue
                    outcomes[rcpt] = outcome
                    log_outcome(envelope.id, rcpt, outcome, delay)
                remaining = retry_here
                if not remaining:
                    return outcomes
                break  # the next hop for the recipients a smart host deferred
        # No hop (left) answered for these: the last failure is the attempt's outcome.
        return {**outcomes, **self._logged(envelope, {rcpt: last_error for rcpt in remaining}, attempt_started)}

    def _send(self, session: ClientSession, envelope: Envelope, recipients: list[str], message: bytes,
              hand_over: Callable[[], None]) -> Deferred[SendResult]:
        """One transaction for all recipients; with VERP, one per recipient, each with its own return path.
        The last transaction hands the session over once its body is written (ClientSession.send)."""
        options: dict[str, Any] = {"body_8bit": envelope.body_8bit, "smtputf8": envelope.smtputf8,
                                   "dsn": dsn_parameters(envelope)}
        sender_domain = recipient_domain(envelope.sender) if envelope.sender else ""
        # An SRS return path (forwarded mail) is not ours to VERP: its bounces belong to the original sender.
        if not (self.config.relay.verp and sender_domain in self._local_domains) or is_srs(envelope.sender):
            return session.send(envelope.sender, recipients, message, body_written=hand_over, **options)
        return self._send_verp(session, sender_domain, recipients, message, hand_over, options)

    @inlineCallbacks
    def _send_verp(self, session: ClientSession, sender_domain: str, recipients: list[str], message: bytes,
                   hand_over: Callable[[], None], options: dict[str, Any]):
        replies = {}
        result = SendResult({})
        for n, rcpt in enumerate(recipients):
            last = n == len(recipients) - 1
            result = yield session.send(verp_sender(sender_domain, rcpt), [rcpt], message,
                                        body_written=hand_over if last else None, **options)
            replies.update(result.replies)
        return SendResult(replies, dsn=result.dsn, chunked=result.chunked)

    def _react(self, envelope: Envelope, pace: Pace, hop: Hop, reply: Reply | None, refused: bool) -> str:
        """What a refusal (or a refused connection) tells the destination group; returns the
        reply's bounce class. A policy, authentication or content block drops the pace to
        the floor and pauses the group; a rate limit or a 421/4.7.x halves the pace (AIMD)."""
        if reply is None:
            category = ""
        else:
            category = classify_reply(reply.status, reply.text, reply.code, self.config.bounce_rules)
            if self.metrics is not None:
                self.metrics.bounces.labels(category, "permanent" if reply.permanent else "temporary").inc()
        if category in BLOCKING and reply is not None:
            if self.metrics is not None:
                self.metrics.blocks.labels(pace.name, category).inc()
            pause = self.config.bounces.block_pause
            if pace.block(pause):
                paced = f"; pace down to {pace.rate:.0f}/min" if pace.rate else ""
                log.warn("{id}: {group} blocks our mail ({category}, {host} said: {reply}): {group} paused for "
                         "{pause:.0f}s{paced}; the mail stays queued", id=envelope.id, group=pace.name,
                         category=category, host=hop.host, reply=str(reply), pause=pause, paced=paced)
            return category
        code, status = (reply.code, reply.effective_status) if reply is not None else (None, "")
        if is_slow_down_signal(code, status, refused) or category == RATE_LIMIT:
            before = pace.rate
            pace.slow_down()
            if pace.rate != before:
                log.info("pace for {group} down to {rate:.0f}/min ({reply})", group=pace.name, rate=pace.rate,
                         reply=str(reply) if reply is not None else "connection refused")
        return category

    def _session_failure(self, error: SessionError, hop: Hop, relay: str, smarthost: bool, tls: str) -> Outcome:
        reply = error.reply
        if reply is not None:
            # A 5xx greeting/EHLO/AUTH from a smart host is a configuration problem:
            # keep the mail queued. From an MX it is that domain's answer: try the next MX.
            return Outcome("deferred", str(reply), reply.effective_status if reply.transient else "4.4.2", hop.host, relay,
                           tls=tls)
        return Outcome("deferred", error.reason, "4.4.1", hop.host, relay, tls=tls)

    def _tls_for(self, hop: Hop) -> tuple[str, Any]:
        smarthost = hop.smarthost
        if smarthost is None:
            return self.config.relay.tls, None
        mode = {"starttls": "starttls-verify", "implicit": "implicit-verify", "none": "none"}[smarthost.tls]
        return mode, self._trust_root(smarthost)

    def _trust_root(self, smarthost: SmartHostConfig) -> Any:
        key = id(smarthost)
        if key not in self._trust_roots:
            from twisted.internet import ssl

            if smarthost.ca_file is not None:
                certificate = ssl.Certificate.loadPEM(smarthost.ca_file.read_bytes())
                self._trust_roots[key] = ssl.trustRootFromCertificates([certificate])
            else:
                self._trust_roots[key] = ssl.platformTrust()
        return self._trust_roots[key]

    def _auth_for(self, smarthost: SmartHostConfig | None) -> tuple[str, str] | None:
        if smarthost is None or smarthost.username is None or smarthost.password_file is None:
            return None
        key = id(smarthost)
        if key not in self._smarthost_secrets:
            password = smarthost.password_file.read_text(encoding="utf-8").strip("\r\n")
            self._smarthost_secrets[key] = (smarthost.username, password)
        return self._smarthost_secrets[key]


def dsn_parameters(envelope: Envelope) -> DSNParameters | None:
    """The RFC 3461 parameters to pass on for `envelope`; None when it has none."""
    notify = {r.address: r.notify for r in envelope.recipients if r.notify is not None}
    orcpt = {r.address: r.orcpt for r in envelope.recipients if r.orcpt is not None}
    if not (envelope.ret or envelope.envid or notify or orcpt):
        return None
    return DSNParameters(envelope.ret, envelope.envid, notify, orcpt)


def _from_reply(reply: Reply, host: str, relay: str, tls: str, category: str = "", dsn: bool = False) -> Outcome:
    if reply.code < 400:
        return Outcome("delivered", str(reply), reply.effective_status, host, relay, tls=tls, dsn_passed=dsn)
    # A block or a rate limit is about us, not the recipient: even a 5xx one keeps the mail
    # queued (it bounces only when queue.lifetime or queue.max_attempts runs out).
    failed = reply.permanent and category not in BLOCKING and category != RATE_LIMIT
    return Outcome("failed" if failed else "deferred", str(reply), reply.effective_status, host, relay, tls=tls,
                   category=category)


def _has_next(hops: tuple[Hop, ...], hop: Hop) -> bool:
    return hop is not hops[-1]

