"""The queue runner: hands due messages to the Deliverer with bounded
concurrency, then records each recipient's result, retries on the
queue.retry steps, gives up after queue.lifetime (queue.marketing_lifetime for
mail from [unsubscribe] senders) or queue.max_attempts, whichever comes first,
and sends the DSNs.

It wakes at the next due time from the in-memory index (never polls the
disk), and an exception in one delivery reschedules that message without
stopping the rest.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.logger import Logger

from mailhost.multiproc.shard import Shard
from mailhost.config import Config
from mailhost.feedback.classify import INVALID_RECIPIENT, MAILBOX_FULL, classify_reply
from mailhost.feedback.dsn import build_dsn
from mailhost.feedback.events import GroupCommit, message_facts
from mailhost.ops.durable import DiskWriter
from mailhost.queue.envelope import DELIVERED, DEFERRED, FAILED, Envelope
from mailhost.feedback.suppression import BounceReport, SuppressionList
from mailhost.intake.cleanup import Intake
from mailhost.message import HOP_LIMIT, too_many_hops
from mailhost.ops.metrics import Metrics
from mailhost.delivery.deliverer import Deliverer, Outcome, log_outcome
from mailhost.queue.spool import (CorruptEnvelope, DueIndex, MessageMissing, Spool, SpoolError, is_queue_id,
                                  raw_envelope_problem)

log = Logger(namespace="mailhost.queue")

ERROR_RETRY_SECONDS = 300.0  # when a delivery attempt itself crashed
LOAD_SLICE = 1000  # envelopes parsed at a time while loading the queue


class Scheduler(service.Service):
    def __init__(self, config: Config, spool: Spool, writer: DiskWriter, deliverer: Deliverer,
                 intake: Intake, reactor: Any, metrics: Metrics, shard: Shard, suppression: SuppressionList,
                 max_in_flight: int = 50, recover_spool: bool = True, loader: DiskWriter | None = None) -> None:
        self.config = config
        self.shard = shard  # which messages of the spool this process delivers
        self.suppression = suppression
        self.spool = spool
        self.writer = writer
        # Loading the next due messages is what the connections wait for: it has threads of its
        # own (reads from the page cache, in milliseconds), not a place in line behind the event
        # log's fsyncs and the removals' unlinks (measured: 140 ms a load in that line, 50 apart).
        self.loader = loader or writer
        self.deliverer = deliverer
        self.intake = intake
        self.reactor = reactor
        self.max_in_flight = max_in_flight
        # Only the main process cleans up interrupted writes: a worker doing so could meet a write in progress.
        self.recover_spool = recover_spool
        self.index = DueIndex()
        self.arrivals: dict[str, float] = {}  # for the oldest-message gauge
        self.metrics = metrics
        metrics.watch_queue(lambda: len(self.arrivals), lambda: min(self.arrivals.values(), default=None))
        if recover_spool:  # one process counts spool/corrupt/, whichever process put them there
            metrics.watch_corrupt(spool.corrupt_count)
        self.in_flight: set[str] = set()  # every message an attempt is running for
        # Of those, the ones still loading or talking to servers: queue.concurrency bounds these.
        # The bookkeeping after the last reply (events, spool, DSNs) holds no connection and
        # is short, so it must not keep the next message from starting (Little's law: a slot
        # held through an fsync is a connection left idle).
        self.delivering: set[str] = set()
        self._deleted: set[str] = set()
        self._held_meanwhile: dict[str, bool] = {}  # hold/release said during a running attempt
        self._timer: Any = None
        self._timer_at: float | None = None
        self._events: GroupCommit | None = None  # the delivery events' group commit
        self.ready: Deferred[None] = Deferred()

    # --- life cycle --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.writer.run(self._load).addCallbacks(self._loaded, self._load_failed)

    def _load(self) -> tuple[list[tuple[str, float, bool, float]], list[tuple[str, str, str | None, str]]]:
        """(id, due time, held, arrival) of every usable envelope of this process's shard, and
        (id, reason, where it went, why it could not be moved) of those set aside (disk thread)."""
        if self.recover_spool:
            for debris in self.spool.recover():
                log.info("removed interrupted write {path}", path=debris)
        # Only this process's shard is read (the id is the file name), with few system calls a file.
        # Each process sets aside the corrupt envelopes of its own shard: nobody else touches those ids.
        paths = [path for path in self.spool.envelope_files() if self.shard.owns(os.path.basename(path)[:-5])]
        entries = []
        corrupt = []
        # A slice at a time: 100,000 parsed envelopes held at once would cost ~250 MB.
        for start in range(0, len(paths), LOAD_SLICE):
            part = paths[start:start + LOAD_SLICE]
            bad: list[tuple[int, str]] = []
            for index, envelope in self.spool.read_raw_envelopes(part, bad):
                folder, name = os.path.split(part[index])
                problem = raw_envelope_problem(envelope, name[:-5], os.path.basename(folder))
                if problem is not None:
                    bad.append((index, problem))
                    continue
                entries.append((envelope["id"], float(envelope["next_attempt"]),
                                bool(envelope.get("held", False)), float(envelope["arrival"])))
            # One bad file must not keep the rest of the queue from loading, nor vanish unseen.
            for index, reason in bad:
                corrupt.append(self._set_aside(part[index], reason))
        return entries, corrupt

    def _set_aside(self, path: str, reason: str) -> tuple[str, str, str | None, str]:
        """Move a corrupt envelope file and its message to spool/corrupt/ (disk thread)."""
        name = os.path.basename(path)[:-5]
        try:
            return name, reason, self.spool.quarantine(path), ""
        except OSError as e:
            return name, reason, None, f"{e.strerror}: {e.filename}"

    def _report_corrupt(self, name: str, reason: str, where: str | None, error: str) -> None:
        if where is not None:
            log.error("{id}: corrupt envelope ({reason}): moved with its message to {path}; not delivered",
                      id=name, reason=reason, path=where)
        else:
            log.error("{id}: corrupt envelope ({reason}): not delivered, and it cannot be moved to {path} ({error})",
                      id=name, reason=reason, path=str(self.spool.corrupt), error=error)

    def _quarantine(self, error: CorruptEnvelope) -> Deferred[None]:
        """An envelope found corrupt when it was due (or adopted): set it aside as at start."""
        self.index.discard(error.queue_id)
        self.arrivals.pop(error.queue_id, None)
        return self.writer.run(self._set_aside, str(self.spool.envelope_path(error.queue_id)), error.reason).addCallback(
            lambda found: self._report_corrupt(*found))

    def _loaded(self, loaded: tuple[list[tuple[str, float, bool, float]], list[tuple[str, str, str | None, str]]],
                ) -> None:
        entries, corrupt = loaded
        for found in corrupt:
            self._report_corrupt(*found)
        for queue_id, when, held, arrival in entries:
            self.arrivals[queue_id] = arrival
            if held:
                self.index.hold(queue_id)
            else:
                self.index.schedule(queue_id, when)
        log.info("queue loaded: {count} messages", count=len(entries))
        self.ready.callback(None)
        self._wake()

    def _load_failed(self, failure: Any) -> None:
        log.failure("cannot read the spool", failure)
        self.ready.callback(None)

    def stopService(self) -> None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.deliverer.pool.close_all()

    # --- what others call --------------------------------------------------------

    def queued(self, envelope: Envelope) -> None:
        """A new message is in the spool."""
        if envelope.id in self.in_flight:
            return  # already found by adopt_strays, and being delivered
        self.index.schedule(envelope.id, envelope.next_attempt)
        self.arrivals[envelope.id] = envelope.arrival
        self._wake()

    def committed(self, queue_id: str) -> Deferred[None]:
        """Load and schedule `queue_id`, committed to the spool without this queue being told
        (adopt_strays: a shard taken over, or a message found after a worker ended)."""
        if not is_queue_id(queue_id):
            return fail(SpoolError(f"{queue_id[:40]!r} is not a queue id"))
        if queue_id in self.index or queue_id in self.in_flight:
            return succeed(None)
        return self.writer.run(self.spool.load, queue_id).addCallback(self._committed)

    def _committed(self, envelope: Envelope) -> None:
        if envelope.id in self.index or envelope.id in self.in_flight:
            return
        if envelope.held:
            self.index.hold(envelope.id)
            self.arrivals[envelope.id] = envelope.arrival
        else:
            self.queued(envelope)

    @inlineCallbacks
    def adopt_strays(self):
        """Schedule every committed message of this process's shard that the index
        does not know (a message committed while nobody could be told, or a
        shard this process has just taken over)."""
        ids = yield self.writer.run(lambda: list(self.spool.ids()))
        found = 0
        for queue_id in ids:
            if queue_id in self.index or queue_id in self.in_flight or not self.shard.owns(queue_id):
                continue
            try:
                yield self.committed(queue_id)
            except CorruptEnvelope as e:
                yield self._quarantine(e)
                continue
            except SpoolError:
                continue  # delivered and removed meanwhile
            found += 1
        if found:
            log.info("queue: {count} messages found in the spool and scheduled", count=found)

    def flush(self, queue_id: str | None = None) -> int:
        """Make one message (or every one not held) due now; returns how many."""
        now = self.reactor.seconds()
        ids = [queue_id] if queue_id else self.index.all_due()
        count = 0
        for one in ids:
            if one in self.index and not self.index.is_held(one) and one not in self.in_flight:
                self.index.schedule(one, now)
                count += 1
        self._wake()
        return count

    @inlineCallbacks
    def set_held(self, queue_id: str, held: bool):
        envelope = yield self.writer.run(self.spool.load, queue_id)
        envelope.held = held
        yield self.writer.run(self.spool.update, envelope)
        log.info("{id}: {what} by the operator", id=queue_id, what="held" if held else "released")
        if queue_id in self.in_flight:
            self._held_meanwhile[queue_id] = held  # the running attempt writes its envelope last: it applies this
            return
        if held:
            self.index.hold(queue_id)
        else:
            self.index.schedule(queue_id, envelope.next_attempt)
            self._wake()

    @inlineCallbacks
    def delete(self, queue_id: str):
        if queue_id in self.in_flight:
            self._deleted.add(queue_id)  # removed when the running attempt ends
            return
        yield self.writer.run(self.spool.remove, queue_id)
        self.index.discard(queue_id)
        self.arrivals.pop(queue_id, None)
        log.info("{id}: removed by the operator", id=queue_id)

    # --- running deliveries ------------------------------------------------------

    def _wake(self) -> None:
        if not self.running:
            return
        now = self.reactor.seconds()
        while len(self.delivering) < self.max_in_flight:
            queue_id = self.index.pop_due(now)
            if queue_id is None:
                break
            self.in_flight.add(queue_id)
            self.delivering.add(queue_id)
            Deferred.fromCoroutine(self._attempt(queue_id))
        self._arm_timer(self.index.next_time())

    def _arm_timer(self, when: float | None) -> None:
        if when is None or len(self.delivering) >= self.max_in_flight:
            return  # a finishing attempt wakes us
        if self._timer is not None and self._timer.active():
            if self._timer_at is not None and self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.reactor.callLater(max(0.0, when - self.reactor.seconds()), self._wake)

    async def _attempt(self, queue_id: str) -> None:
        # A coroutine, as are _deliver_except and _record it awaits: a chain of awaits resumes in
        # one step when a Deferred fires, where each inlineCallbacks generator took a turn of its own.
        try:
            envelope, message, suppressed = await self.loader.run_together(self._load_attempt, queue_id)
            if envelope.held:
                self.index.hold(queue_id)
                return
            if envelope.done:
                # Every recipient is final but a report to the sender could not be sent last time.
                outcomes = {}
            elif too_many_hops(message):
                text = f"too many hops: more than {HOP_LIMIT} Received: headers (mail loop)"
                outcomes = {r.address: Outcome(FAILED, text, "5.4.6") for r in envelope.pending()}
                for address, outcome in outcomes.items():
                    log_outcome(envelope.id, address, outcome, 0.0)
            elif suppressed:
                # Suppressed since it was queued (a bounce, a complaint, the operator): not sent.
                outcomes = await self._deliver_except(envelope, message, suppressed)
            else:
                outcomes = await self.deliverer.deliver(envelope, message)
            self._delivered(queue_id)
            await self._record(envelope, message, outcomes)
        except MessageMissing:
            # The removal after its delivery did not reach the disk before a crash
            # (Spool.remove with sync=False): the message went out; finish the removal.
            await self.writer.run(self.spool.remove, queue_id).addCallbacks(
                lambda _: log.info("{id}: removed (its message file was already gone: a removal cut short by a crash)",
                                   id=queue_id),
                lambda failure: log.warn("{id}: {error}", id=queue_id, error=failure.getErrorMessage()))
        except CorruptEnvelope as e:
            await self._quarantine(e)
        except SpoolError as e:
            log.warn("{id}: {error}", id=queue_id, error=str(e))
        except Exception:
            log.failure("{id}: delivery attempt failed; retrying later", id=queue_id)
            if queue_id in self.index or self.spool.envelope_path(queue_id).exists():
                self.index.schedule(queue_id, self.reactor.seconds() + ERROR_RETRY_SECONDS)
        finally:
            self.delivering.discard(queue_id)
            self.in_flight.discard(queue_id)
            self._held_meanwhile.pop(queue_id, None)
            if queue_id in self._deleted:
                self._deleted.discard(queue_id)
                try:
                    await self.delete(queue_id)
                except SpoolError:
                    pass  # the attempt finished it and removed it already
            self._wake()

    def _delivered(self, queue_id: str) -> None:
        """The attempt has its outcomes: its concurrency slot goes to the next due message."""
        self.delivering.discard(queue_id)
        self._wake()

    def _load_attempt(self, queue_id: str) -> tuple[Envelope, bytes, dict[str, str]]:
        """The envelope, the message, and why each pending recipient now suppressed is (disk thread)."""
        envelope, message = self.spool.load_with_message(queue_id)
        suppressed = {}
        for recipient in envelope.pending():
            entry = self.suppression.is_suppressed(recipient.address, envelope.sender)
            if entry is not None:
                suppressed[recipient.address] = (f"recipient suppressed since {entry.date[:10]} "
                                                  f"({entry.source}: {entry.status} {entry.reason[:120]})")
        return envelope, message, suppressed

    async def _deliver_except(self, envelope: Envelope, message: bytes,
                              suppressed: dict[str, str]) -> dict[str, Outcome]:
        outcomes = {address: Outcome(FAILED, reason, "5.7.1") for address, reason in suppressed.items()}
        for address, outcome in outcomes.items():
            log_outcome(envelope.id, address, outcome, 0.0)
        rest = [r for r in envelope.pending() if r.address not in suppressed]
        if rest:
            outcomes.update(await self.deliverer.deliver(envelope, message, rest))
        return outcomes

    def _feed_suppression(self, envelope: Envelope, outcomes: dict[str, Outcome]) -> Deferred[None]:
        """A remote server's refusal during our own delivery says what a DSN coming back would,
        and the same classifier has read it (the deliverer): an unknown user suppresses, a full
        or inactive mailbox counts as soft (a deferral once per message); a policy,
        authentication or content block, a rate limit, ... suppresses nobody."""
        reports = []
        attempts = {r.address: r.attempts for r in envelope.recipients}
        for address, outcome in outcomes.items():
            if not outcome.remote_mta or outcome.state not in ("failed", "deferred"):
                continue
            if outcome.state == "deferred" and attempts.get(address, 0) > 1:
                # A deferral counts once per message, as the one "delayed" DSN a relay sends would:
                # retries a minute apart are not soft bounces of their own.
                continue
            category = outcome.category or classify_reply(outcome.status, outcome.reply,
                                                          rules=self.config.bounce_rules)
            if category in (INVALID_RECIPIENT, MAILBOX_FULL):
                reports.append(BounceReport(address, outcome.status, "failed" if outcome.state == "failed" else "delayed",
                                            outcome.reply, outcome.state == "failed", category=category))
        if not reports:
            return succeed(None)

        def record() -> None:
            for report in reports:
                if self.suppression.is_suppressed(report.recipient) is None and self.suppression.record_bounce(report):
                    log.info("{id}: suppressed <{rcpt}>: {status} {diagnostic}", id=envelope.id, rcpt=report.recipient,
                             status=report.status, diagnostic=report.diagnostic)

        return self.writer.run(record).addErrback(
            lambda failure: log.failure("{id}: cannot update the suppression list", failure, id=envelope.id))

    async def _record(self, envelope: Envelope, message: bytes, outcomes: dict[str, Outcome]) -> None:
        now = self.reactor.seconds()
        throttled_until: float | None = None
        for recipient in envelope.pending():
            outcome = outcomes.get(recipient.address)
            if outcome is None:
                continue
            if outcome.state == "throttled":
                # Not an attempt: the group's pace says later. Nothing about the recipient changes.
                throttled_until = min(throttled_until or float("inf"), now + outcome.retry_in)
                continue
            recipient.attempts += 1
            recipient.state = {"delivered": DELIVERED, "failed": FAILED}.get(outcome.state, DEFERRED)
            self.metrics.deliveries.labels({DELIVERED: "delivered", FAILED: "bounced"}.get(recipient.state, "deferred")).inc()
            if recipient.state == DELIVERED:
                self.metrics.delivery_delay.observe(now - envelope.arrival)
                if self.intake.complaint_rate is not None:  # the denominator of the complaint rate
                    self.intake.complaint_rate.delivered(recipient.address)
            recipient.last_reply = outcome.reply
            recipient.status = outcome.status
            recipient.remote_mta = outcome.remote_mta
        await self._feed_suppression(envelope, outcomes)
        queue = self.config.queue
        given_up = []
        for recipient in envelope.pending():
            why = self._given_up(envelope, recipient, now)
            if why is None:
                continue
            recipient.state = FAILED
            recipient.status = "4.4.7"  # RFC 3463 3.5: delivery time expired
            recipient.last_reply = f"{why}; last: {recipient.last_reply}"
            given_up.append(recipient)
            self.metrics.deliveries.labels("expired").inc()
            log.info("{id}: to=<{rcpt}> status=expired ({reply})", id=envelope.id, rcpt=recipient.address,
                     reply=recipient.last_reply)
        await self._record_events(envelope, message, outcomes, given_up)
        await self._send_dsns(envelope, message, now)
        await self._report_relayed(envelope, message, outcomes, now)
        if envelope.done and not self._reports_owed(envelope):
            await self.writer.run_together(self.spool.remove, envelope.id, False)
            self.arrivals.pop(envelope.id, None)
            log.info("{id}: removed (every recipient delivered or bounced)", id=envelope.id)
            return
        tried = [r.attempts for r in envelope.pending() if outcomes.get(r.address, None) is not None
                 and outcomes[r.address].state != "throttled"]
        envelope.next_attempt = now + queue.retry[min(max(max(tried, default=1), 1), len(queue.retry)) - 1]
        if throttled_until is not None:
            envelope.next_attempt = min(envelope.next_attempt, throttled_until) if tried else throttled_until
        envelope.held = self._held_meanwhile.pop(envelope.id, envelope.held)
        await self.writer.run(self.spool.update, envelope)
        if envelope.held:
            self.index.hold(envelope.id)
        else:
            self.index.schedule(envelope.id, envelope.next_attempt)

    def _record_events(self, envelope: Envelope, message: bytes, outcomes: dict[str, Outcome],
                       given_up: list[Any]) -> Deferred[None]:
        """Tell the event log (webhooks, the API) what this attempt did to each recipient (and
        which it gave up on just now), on the disk thread, before the result moves on; a failure
        to record is logged, never fatal."""
        events = self.suppression.events
        tried = [r for r in envelope.recipients if (r.address in outcomes and outcomes[r.address].state != "throttled")
                 or r in given_up]
        if events is None or not tried:
            return succeed(None)

        rules = self.config.bounce_rules

        def make() -> list[dict[str, Any]]:
            facts = message_facts(message)
            found = []
            for r in tried:
                kind = {DELIVERED: "delivered", FAILED: "bounced"}.get(r.state, "deferred")
                category = "" if r.state == DELIVERED else classify_reply(r.status, r.last_reply, rules=rules)
                found.append({"event": kind, "queue_id": envelope.id, "recipient": r.address, "sender": envelope.sender,
                              "status": r.status, "reply": r.last_reply, "remote_mta": r.remote_mta,
                              "attempts": r.attempts, "class": category, **facts})
            return found

        if self._events is None or self._events.log is not events:
            self._events = GroupCommit(events, self.writer.run)
        # With the other attempts' events: one write and one fsync for all of them.
        return self._events.record(make).addErrback(
            lambda failure: log.failure("{id}: cannot record the delivery events", failure, id=envelope.id))

    def lifetime_of(self, envelope: Envelope) -> tuple[float, str]:
        """How long the message may stay queued, and the key that says so: marketing mail (its
        envelope sender is one of [unsubscribe] senders) has its own, shorter lifetime."""
        queue = self.config.queue
        if envelope.sender and self.config.unsubscribe.is_marketing(envelope.sender):
            return queue.marketing_lifetime, "queue.marketing_lifetime"
        return queue.lifetime, "queue.lifetime"

    def _given_up(self, envelope: Envelope, recipient: Any, now: float) -> str | None:
        """Why a pending recipient is returned to the sender now (which limit it reached), or None."""
        lifetime, key = self.lifetime_of(envelope)
        if now - envelope.arrival >= lifetime:
            return (f"delivery time expired after {recipient.attempts} attempts: not delivered within "
                    f"{_span(lifetime)} ({key})")
        limit = self.config.queue.max_attempts
        if limit and recipient.attempts >= limit:
            return f"gave up after {recipient.attempts} failed attempts (queue.max_attempts = {limit})"
        return None

    def _report_relayed(self, envelope: Envelope, message: bytes, outcomes: dict[str, Outcome],
                        now: float) -> Deferred[None]:
        """RFC 3461 NOTIFY=SUCCESS for recipients handed this attempt to a next hop that does not
        speak DSN: a "relayed" report (one that does got NOTIFY and reports itself)."""
        relayed = [r for r in envelope.recipients if r.state == DELIVERED and r.wants("SUCCESS")
                   and r.address in outcomes and outcomes[r.address].state == "delivered"
                   and not outcomes[r.address].dsn_passed]
        if not relayed or not envelope.sender:
            return succeed(None)
        report = build_dsn(envelope, relayed, message, hostname=self.config.server.hostname, kind="relayed", now=now)
        return self._send_report(envelope, report, "relayed").addCallback(lambda _: None)

    def _send_dsns(self, envelope: Envelope, message: bytes, now: float) -> Deferred[None]:
        """Bounce what failed and warn about what is late; most attempts have neither."""
        delay = self.config.queue.delay_warning
        late = delay > 0 and not envelope.delay_warned and envelope.pending() and now - envelope.arrival >= delay
        if not late and not any(r.state == FAILED and not r.bounced for r in envelope.recipients):
            return succeed(None)
        return self._notify(envelope, message, now)

    @staticmethod
    def _reports_owed(envelope: Envelope) -> bool:
        """A failure the sender has not been told about yet (its report could not be sent)."""
        return bool(envelope.sender) and any(r.state == FAILED and not r.bounced for r in envelope.recipients)

    @inlineCallbacks
    def _notify(self, envelope: Envelope, message: bytes, now: float):
        """Send the reports; one that cannot be sent now (the intake failed) is tried again at
        the next attempt, and the recipients' states are kept either way (never a second delivery)."""
        hostname = self.config.server.hostname
        failed = [r for r in envelope.recipients if r.state == FAILED and not r.bounced]
        for recipient in failed:
            if not recipient.wants("FAILURE"):
                recipient.bounced = True  # RFC 3461 4.1: NOTIFY without FAILURE (or NEVER): no report
        failed = [r for r in failed if not r.bounced]
        if failed:
            if envelope.sender:
                bounce = build_dsn(envelope, failed, message, hostname=hostname, kind="failure", now=now)
                bounce_id = yield self._send_report(envelope, bounce, "non-delivery")
                if bounce_id is None:
                    failed = []
            for recipient in failed:
                recipient.bounced = True
        delay = self.config.queue.delay_warning
        if delay > 0 and not envelope.delay_warned and envelope.pending() and now - envelope.arrival >= delay:
            late = [r for r in envelope.pending() if r.wants("DELAY")]  # RFC 3461 4.1
            if envelope.sender and late:
                warning = build_dsn(envelope, late, message, hostname=hostname, kind="delay", now=now,
                                    retry_until=envelope.arrival + self.lifetime_of(envelope)[0])
                if (yield self._send_report(envelope, warning, "delay")) is None:
                    return
            envelope.delay_warned = True

    def _send_report(self, envelope: Envelope, report: bytes, kind: str) -> Deferred[str | None]:
        """Hand a report to the intake; fires with its queue id, or None when it could not be sent."""
        def sent(report_id: str) -> str:
            log.info("{id}: sender {kind} notification: {report}", id=envelope.id, kind=kind, report=report_id)
            return report_id

        def not_sent(failure: Any) -> None:
            log.failure("{id}: cannot send the {kind} notification; trying again at the next attempt", failure,
                        id=envelope.id, kind=kind)
            return None

        return self.intake.notify(envelope.sender, report).addCallbacks(sent, not_sent)


def _span(seconds: float) -> str:
    """A lifetime as the configuration would write it: "5d", "1d", "12h", "30m", "45s"."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
