"""The queue runner (mailhost.delivery.scheduler.Scheduler) on a fake clock.

Retries, expiry, delay warnings and pace re-queues, checked where a user would
look: the envelope in a real spool, whether the message is still queued, and
the DSNs handed to the intake. Time is twisted's task.Clock (the scheduler
reads the reactor's clock), disk work runs synchronously, and the deliverer is
a script of outcomes: no sleeps, no threads, no network.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from mailhost.config import Config, load
from mailhost.delivery.deliverer import Outcome
from mailhost.delivery.scheduler import ERROR_RETRY_SECONDS, Scheduler
from mailhost.feedback.suppression import SuppressionList
from mailhost.multiproc.shard import EVERYTHING
from mailhost.ops.metrics import Metrics
from mailhost.queue.envelope import DEFERRED, DELIVERED, FAILED, PENDING, Envelope, Recipient
from mailhost.queue.spool import Spool, SpoolError, new_queue_id

START = 1_700_000_000.0  # the clock's epoch time when a test begins
SENDER = "alice@example.test"
MESSAGE = b"From: alice@example.test\nTo: bob@remote.test\nSubject: hello\nMessage-ID: <1@example.test>\n\nhi\n"

DEFER = Outcome("deferred", "451 4.7.1 try again later", "4.7.1", "mx.remote.test")
BOUNCE = Outcome("failed", "550 5.1.1 no such user", "5.1.1", "mx.remote.test")
SENT = Outcome("delivered", "250 2.0.0 ok", "2.0.0", "mx.remote.test")


def throttled(seconds: float) -> Outcome:
    return Outcome("throttled", "over the pace for remote.test", "4.7.0", retry_in=seconds)


CONFIG = """
[server]
hostname = "mail.example.test"
state_dir = "state"

[[listener]]
role = "mx"
endpoint = "tcp:2525:interface=127.0.0.1"

[[domain]]
name = "example.test"
maildir = "mail/example.test"
users = "users"

[queue]
retry = [{retry}]
lifetime = "{lifetime}"
delay_warning = "{delay_warning}"
"""


# --- stand-ins ---------------------------------------------------------------------


class SyncWriter:
    """DiskWriter without threads: the work runs at once, its result in a fired Deferred."""

    def run(self, f: Callable[..., Any], *a: Any, **kw: Any) -> defer.Deferred:
        try:
            return defer.succeed(f(*a, **kw))
        except Exception:
            return defer.fail()

    run_together = run


class FakePool:
    def __init__(self) -> None:
        self.closed = 0

    def close_all(self) -> None:
        self.closed += 1


class FakeDeliverer:
    """Answers each recipient with `respond(address)`: an Outcome, or an exception to raise
    (`fail_with`: raised at once, or as a failed Deferred when `asynchronous`)."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.pool = FakePool()
        self.respond: Callable[[str], Outcome] = lambda address: DEFER
        self.fail_with: Exception | None = None
        self.asynchronous = False
        self.calls: list[tuple[float, list[str]]] = []  # (when, pending recipients given)

    def deliver(self, envelope: Envelope, message: bytes, recipients: list | None = None) -> defer.Deferred:
        recipients = envelope.pending() if recipients is None else recipients
        self.calls.append((self.clock.seconds(), [r.address for r in recipients]))
        if self.fail_with is not None:
            if self.asynchronous:
                return defer.fail(self.fail_with)
            raise self.fail_with
        return defer.succeed({r.address: self.respond(r.address) for r in recipients})


@dataclass
class Notice:
    """A message the scheduler asked the intake to send (a DSN)."""

    sender: str
    recipients: list[str]
    message: bytes

    @property
    def kind(self) -> str:
        action = re.search(rb"^Action: (\w+)", self.message, re.MULTILINE)
        return {b"failed": "failure", b"delayed": "delay", b"relayed": "relayed"}.get(
            action.group(1) if action else b"", "?")

    @property
    def statuses(self) -> list[str]:
        return [s.decode() for s in re.findall(rb"^Status: (\S+)", self.message, re.MULTILINE)]


class FakeIntake:
    """Records the reports the scheduler sends through the intake (Intake.notify)."""

    complaint_rate = None

    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self.fail_with: Exception | None = None

    def notify(self, recipient: str, report: bytes) -> defer.Deferred:
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        self.notices.append(Notice("", [recipient], report))
        return defer.succeed("BOUNCEID")

    def kinds(self) -> list[str]:
        return [n.kind for n in self.notices]


@dataclass
class Queue:
    clock: task.Clock
    config: Config
    spool: Spool
    deliverer: FakeDeliverer
    intake: FakeIntake
    scheduler: Scheduler

    @property
    def suppression(self) -> SuppressionList:
        return self.scheduler.suppression

    def enqueue(self, *recipients: str, sender: str = SENDER, due_in: float = 0.0,
                notify: dict[str, list[str]] | None = None) -> str:
        """Commit a message and tell the scheduler, as the intake does; returns its queue id.
        `notify`: RFC 3461 NOTIFY by recipient."""
        now = self.clock.seconds()
        envelope = Envelope(new_queue_id(), sender, [Recipient(r, notify=(notify or {}).get(r)) for r in recipients],
                            now, now + due_in, client="client.example (127.0.0.1)")
        self.spool.store(envelope, [MESSAGE])
        self.scheduler.queued(envelope)
        return envelope.id

    def load(self, queue_id: str) -> Envelope:
        return self.spool.load(queue_id)

    def is_queued(self, queue_id: str) -> bool:
        try:
            self.spool.load(queue_id)
        except SpoolError:
            assert not self.spool.message_path(queue_id).exists()
            return False
        return True

    def advance_to(self, when: float) -> None:
        self.clock.advance(when - self.clock.seconds())

    def run_attempts(self, queue_id: str, count: int) -> None:
        """Let `count` more attempts happen, each at the envelope's next_attempt."""
        for _ in range(count):
            before = len(self.deliverer.calls)
            self.advance_to(self.load(queue_id).next_attempt)
            assert len(self.deliverer.calls) == before + 1


@pytest.fixture
def make_queue(tmp_path: Path) -> Callable[..., Queue]:
    made: list[Scheduler] = []

    def make(retry: tuple[str, ...] = ("1m", "5m", "15m"), lifetime: str = "5d", delay_warning: str = "0") -> Queue:
        (tmp_path / "mailhost.toml").write_text(CONFIG.format(
            retry=", ".join(f'"{r}"' for r in retry), lifetime=lifetime, delay_warning=delay_warning))
        config = load(tmp_path / "mailhost.toml")
        clock = task.Clock()
        clock.advance(START)
        spool = Spool(tmp_path / "spool")
        deliverer = FakeDeliverer(clock)
        intake = FakeIntake()
        suppression = SuppressionList(tmp_path / "suppression.json")
        scheduler = Scheduler(config, spool, SyncWriter(), deliverer, intake, clock, Metrics(), EVERYTHING, suppression)
        scheduler.startService()
        assert scheduler.ready.called
        made.append(scheduler)
        return Queue(clock, config, spool, deliverer, intake, scheduler)

    yield make
    for scheduler in made:
        if scheduler.running:
            scheduler.stopService()


# --- retries -----------------------------------------------------------------------


@pytest.mark.parametrize("failures, wait", [
    (1, 60.0),  # retry[0]
    (2, 300.0),  # retry[1]
    (3, 900.0),  # retry[2], the last step
    (4, 900.0),  # past the steps: the last one again
    (6, 900.0),
])
def test_deferral_waits_the_retry_step_of_its_attempt_count(make_queue, failures, wait):
    q = make_queue(retry=("1m", "5m", "15m"))
    queue_id = q.enqueue("bob@remote.test")  # tried at once
    q.run_attempts(queue_id, failures - 1)
    envelope = q.load(queue_id)
    [recipient] = envelope.recipients
    assert (recipient.state, recipient.attempts) == (DEFERRED, failures)
    assert (recipient.last_reply, recipient.status, recipient.remote_mta) == (DEFER.reply, "4.7.1", "mx.remote.test")
    assert envelope.next_attempt == q.clock.seconds() + wait
    assert q.intake.notices == []


def test_only_pending_recipients_are_tried_again(make_queue):
    q = make_queue()
    q.deliverer.respond = lambda address: SENT if address == "bob@remote.test" else DEFER
    queue_id = q.enqueue("bob@remote.test", "carol@remote.test")
    states = {r.address: (r.state, r.attempts) for r in q.load(queue_id).recipients}
    assert states == {"bob@remote.test": (DELIVERED, 1), "carol@remote.test": (DEFERRED, 1)}
    q.run_attempts(queue_id, 1)
    assert q.deliverer.calls[-1][1] == ["carol@remote.test"]


# --- delivered and failed --------------------------------------------------------------


def test_delivered_message_leaves_the_spool(make_queue):
    q = make_queue()
    q.deliverer.respond = lambda address: SENT
    queue_id = q.enqueue("bob@remote.test", "carol@remote.test")
    assert len(q.deliverer.calls) == 1
    assert not q.is_queued(queue_id)
    assert queue_id not in q.scheduler.index and queue_id not in q.scheduler.arrivals
    assert q.intake.notices == []
    q.clock.advance(7 * 86400)
    assert len(q.deliverer.calls) == 1  # never tried again


@pytest.mark.parametrize("sender, notices", [
    (SENDER, [("failure", "", [SENDER])]),
    ("", []),  # never a DSN about a DSN
])
def test_permanent_failure_is_bounced_once_to_the_sender(make_queue, sender, notices):
    q = make_queue()
    q.deliverer.respond = lambda address: BOUNCE if address == "bad@remote.test" else DEFER
    queue_id = q.enqueue("bad@remote.test", "slow@remote.test", sender=sender)
    recipients = {r.address: r for r in q.load(queue_id).recipients}
    bad = recipients["bad@remote.test"]
    assert (bad.state, bad.status, bad.last_reply, bad.bounced) == (FAILED, "5.1.1", BOUNCE.reply, True)
    assert recipients["slow@remote.test"].state == DEFERRED
    q.run_attempts(queue_id, 2)  # later attempts do not bounce it again
    assert [(n.kind, n.sender, n.recipients) for n in q.intake.notices] == notices
    assert [n.statuses for n in q.intake.notices] == [["5.1.1"]] * len(notices)


@pytest.mark.parametrize("sender, bounces", [(SENDER, 1), ("", 0)])
def test_message_whose_only_recipient_failed_is_bounced_and_removed(make_queue, sender, bounces):
    q = make_queue()
    q.deliverer.respond = lambda address: BOUNCE
    queue_id = q.enqueue("bad@remote.test", sender=sender)
    assert not q.is_queued(queue_id)
    assert q.intake.kinds() == ["failure"] * bounces


# --- lifetime ------------------------------------------------------------------------


@pytest.mark.parametrize("sender, bounces", [(SENDER, 1), ("", 0)])
def test_recipient_still_deferred_after_the_lifetime_expires_with_4_4_7(make_queue, sender, bounces):
    # Attempts at 0, 10, 20 and 30 minutes; the lifetime ends at 30.
    q = make_queue(retry=("10m",), lifetime="30m")
    queue_id = q.enqueue("bob@remote.test", "carol@remote.test", sender=sender)
    q.run_attempts(queue_id, 2)
    envelope = q.load(queue_id)
    assert [(r.state, r.attempts) for r in envelope.recipients] == [(DEFERRED, 3)] * 2
    assert envelope.next_attempt == START + 1800
    assert q.intake.notices == []

    q.run_attempts(queue_id, 1)  # at arrival + lifetime exactly
    assert not q.is_queued(queue_id)
    assert [(n.kind, n.recipients) for n in q.intake.notices] == [("failure", [SENDER])] * bounces
    for notice in q.intake.notices:
        assert notice.statuses == ["4.4.7", "4.4.7"]
        assert b"delivery time expired after 4 attempts" in notice.message


def test_lifetime_does_not_expire_what_was_delivered_meanwhile(make_queue):
    q = make_queue(retry=("10m",), lifetime="30m")
    queue_id = q.enqueue("bob@remote.test")
    q.run_attempts(queue_id, 2)
    q.deliverer.respond = lambda address: SENT
    q.run_attempts(queue_id, 1)  # succeeds on the attempt at the lifetime's end
    assert not q.is_queued(queue_id)
    assert q.intake.notices == []


# --- delay warnings ------------------------------------------------------------------


@pytest.mark.parametrize("delay_warning, sender, warned_at_attempt", [
    ("30m", SENDER, 4),  # attempts at 0, 10, 20, 30, ... minutes: the 4th is the first at or past 30m
    ("25m", SENDER, 4),
    ("10m", SENDER, 2),
    ("0", SENDER, None),  # "0": never warn
    ("30m", "", None),  # no DSN to the null sender
])
def test_one_delay_warning_once_delay_warning_has_passed(make_queue, delay_warning, sender, warned_at_attempt):
    q = make_queue(retry=("10m",), lifetime="5d", delay_warning=delay_warning)
    queue_id = q.enqueue("bob@remote.test", sender=sender)
    kinds = [q.intake.kinds()]
    for _ in range(7):
        q.run_attempts(queue_id, 1)
        kinds.append(q.intake.kinds())
    expected = [[] if warned_at_attempt is None or n < warned_at_attempt else ["delay"] for n in range(1, 9)]
    assert kinds == expected
    for notice in q.intake.notices:
        assert (notice.sender, notice.recipients) == ("", [SENDER])
    assert q.load(queue_id).delay_warned is (delay_warning != "0")
    assert q.load(queue_id).recipients[0].state == DEFERRED


def test_delay_warning_then_bounce_at_expiry(make_queue):
    q = make_queue(retry=("10m",), lifetime="30m", delay_warning="15m")
    queue_id = q.enqueue("bob@remote.test")
    q.run_attempts(queue_id, 3)
    assert not q.is_queued(queue_id)
    assert q.intake.kinds() == ["delay", "failure"]


# --- RFC 3461 NOTIFY --------------------------------------------------------------------


@pytest.mark.parametrize("notify, kinds", [
    (None, ["delay", "failure"]),  # not given: failures and delays, as always
    (["NEVER"], []),
    (["SUCCESS"], []),
    (["DELAY"], ["delay"]),
    (["FAILURE"], ["failure"]),
    (["FAILURE", "DELAY"], ["delay", "failure"]),
])
def test_notify_decides_which_reports_are_sent(make_queue, notify, kinds):
    q = make_queue(retry=("10m",), lifetime="30m", delay_warning="15m")
    queue_id = q.enqueue("bob@remote.test", notify={"bob@remote.test": notify})
    q.run_attempts(queue_id, 3)
    assert not q.is_queued(queue_id)  # given up either way, and nothing owed
    assert q.intake.kinds() == kinds


@pytest.mark.parametrize("dsn_passed, kinds", [(False, ["relayed"]), (True, [])])
def test_notify_success_is_reported_relayed_when_the_next_hop_lacks_dsn(make_queue, dsn_passed, kinds):
    q = make_queue()
    q.deliverer.respond = lambda address: replace(SENT, dsn_passed=dsn_passed)
    queue_id = q.enqueue("bob@remote.test", "carol@remote.test", notify={"bob@remote.test": ["SUCCESS"]})
    assert not q.is_queued(queue_id)
    assert q.intake.kinds() == kinds
    if kinds:
        assert b"bob@remote.test" in q.intake.notices[0].message and b"carol@" not in q.intake.notices[0].message


# --- pace re-queues -------------------------------------------------------------------


def test_throttled_is_not_an_attempt_and_is_due_again_after_retry_in(make_queue):
    q = make_queue()
    q.deliverer.respond = lambda address: throttled(7.5)
    queue_id = q.enqueue("bob@remote.test")
    envelope = q.load(queue_id)
    [recipient] = envelope.recipients
    assert (recipient.state, recipient.attempts, recipient.last_reply) == (PENDING, 0, "")
    assert envelope.next_attempt == START + 7.5
    q.clock.advance(7.4)
    assert len(q.deliverer.calls) == 1
    q.clock.advance(0.1)
    assert len(q.deliverer.calls) == 2


def test_throttled_after_a_deferral_keeps_the_attempt_count(make_queue):
    q = make_queue(retry=("1m", "5m"))
    queue_id = q.enqueue("bob@remote.test")  # deferred: attempt 1
    q.deliverer.respond = lambda address: throttled(30)
    q.run_attempts(queue_id, 3)
    envelope = q.load(queue_id)
    assert (envelope.recipients[0].state, envelope.recipients[0].attempts) == (DEFERRED, 1)
    assert envelope.next_attempt == q.clock.seconds() + 30
    q.deliverer.respond = lambda address: DEFER
    q.run_attempts(queue_id, 1)  # attempt 2: the second step
    envelope = q.load(queue_id)
    assert envelope.recipients[0].attempts == 2
    assert envelope.next_attempt == q.clock.seconds() + 300


@pytest.mark.parametrize("retry_in, wait", [(7.0, 7.0), (600.0, 60.0)])
def test_throttled_and_deferred_recipients_take_the_sooner_time(make_queue, retry_in, wait):
    # One next_attempt per message: the deferred recipient is tried again with the paced one,
    # before its own retry step when the pace's slot comes first.
    q = make_queue(retry=("1m",))
    q.deliverer.respond = lambda address: throttled(retry_in) if address == "paced@big.test" else DEFER
    queue_id = q.enqueue("paced@big.test", "bob@remote.test")
    envelope = q.load(queue_id)
    assert {r.address: r.attempts for r in envelope.recipients} == {"paced@big.test": 0, "bob@remote.test": 1}
    assert envelope.next_attempt == START + wait


# --- a crashing delivery ---------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True], ids=["raises", "failed-deferred"])
def test_deliverer_exception_retries_later_without_losing_the_message(make_queue, asynchronous):
    q = make_queue(delay_warning="0")
    q.deliverer.fail_with = RuntimeError("boom")
    q.deliverer.asynchronous = asynchronous
    queue_id = q.enqueue("bob@remote.test")
    assert len(q.deliverer.calls) == 1
    envelope = q.load(queue_id)
    assert (envelope.recipients[0].state, envelope.recipients[0].attempts) == (PENDING, 0)
    assert queue_id not in q.scheduler.in_flight

    q.deliverer.fail_with = None
    q.deliverer.respond = lambda address: SENT
    q.clock.advance(ERROR_RETRY_SECONDS - 1)
    assert len(q.deliverer.calls) == 1
    q.clock.advance(1)
    assert q.deliverer.calls[1][0] == START + ERROR_RETRY_SECONDS
    assert not q.is_queued(queue_id)


def test_a_crashing_message_does_not_stop_the_others(make_queue):
    q = make_queue()

    def respond(address: str) -> Outcome:
        if address == "bad@remote.test":
            raise RuntimeError("boom")
        return SENT

    q.deliverer.respond = respond
    bad = q.enqueue("bad@remote.test")
    good = q.enqueue("bob@remote.test")
    assert q.is_queued(bad) and not q.is_queued(good)


# --- waking ------------------------------------------------------------------------


def test_wakes_only_when_a_message_is_due(make_queue):
    q = make_queue(retry=("1m",))
    queue_id = q.enqueue("bob@remote.test", due_in=100)
    assert q.deliverer.calls == []
    [timer] = q.clock.getDelayedCalls()  # one timer at the due time, no polling
    assert timer.getTime() == START + 100
    q.clock.advance(99.9)
    assert q.deliverer.calls == []
    q.clock.advance(0.1)
    assert [when for when, _ in q.deliverer.calls] == [START + 100]

    # Deferred: due again a minute later, and not before.
    assert q.load(queue_id).next_attempt == START + 160
    q.clock.advance(59.9)
    assert len(q.deliverer.calls) == 1
    q.clock.advance(0.1)
    assert [when for when, _ in q.deliverer.calls] == [START + 100, START + 160]


def test_an_earlier_message_brings_the_wake_up_forward(make_queue):
    q = make_queue()
    later = q.enqueue("bob@remote.test", due_in=500)
    sooner = q.enqueue("carol@remote.test", due_in=50)
    assert [t.getTime() for t in q.clock.getDelayedCalls() if t.active()] == [START + 50]
    q.clock.advance(50)
    assert q.deliverer.calls == [(START + 50, ["carol@remote.test"])]
    assert q.load(sooner).recipients[0].attempts == 1 and q.load(later).recipients[0].attempts == 0


def test_flush_makes_a_deferred_message_due_now(make_queue):
    q = make_queue(retry=("1h",))
    queue_id = q.enqueue("bob@remote.test")
    q.clock.advance(10)
    assert q.scheduler.flush(queue_id) == 1
    assert [when for when, _ in q.deliverer.calls] == [START, START + 10]


# --- the suppression list --------------------------------------------------------------


@pytest.mark.parametrize("reply, status, suppressed", [
    ("550 5.1.1 The email account does not exist", "5.1.1", True),
    ("550 5.2.1 mailbox disabled", "5.2.1", False),  # inactive: soft, counts towards bounces.soft_limit
    ("550 5.7.26 Unauthenticated email is not accepted", "5.7.26", False),  # the sender is at fault
    ("552 5.3.4 message too big", "5.3.4", False),
    ("554 5.6.0 content refused", "5.6.0", False),
])
def test_a_synchronous_refusal_feeds_the_suppression_list_as_a_returned_dsn_would(make_queue, reply, status, suppressed):
    q = make_queue()
    q.deliverer.respond = lambda address: Outcome("failed", reply, status, "mx.remote.test")
    q.enqueue("gone@remote.test")
    assert (q.suppression.is_suppressed("gone@remote.test") is not None) == suppressed
    assert q.intake.kinds() == ["failure"]  # the sender hears of it either way


def test_our_own_failure_without_a_remote_reply_suppresses_nobody(make_queue):
    q = make_queue()
    q.deliverer.respond = lambda address: Outcome("failed", "no MX: null MX (RFC 7505)", "5.1.10")
    q.enqueue("nobody@nullmx.test")
    assert q.suppression.is_suppressed("nobody@nullmx.test") is None


def test_a_deferral_suppresses_nobody(make_queue):
    q = make_queue()
    queue_id = q.enqueue("slow@remote.test")
    q.run_attempts(queue_id, 3)
    assert q.suppression.is_suppressed("slow@remote.test") is None


def test_recipient_suppressed_after_queueing_is_not_sent_to_and_bounced(make_queue):
    q = make_queue()
    queue_id = q.enqueue("gone@remote.test", "bob@remote.test", due_in=60)
    q.suppression.add("gone@remote.test", "5.1.1", "a bounce", source="bounce")
    q.deliverer.respond = lambda address: SENT
    q.advance_to(START + 60)
    assert q.deliverer.calls == [(START + 60, ["bob@remote.test"])]
    assert not q.is_queued(queue_id)
    [notice] = q.intake.notices
    assert notice.kind == "failure" and b"gone@remote.test" in notice.message and b"suppressed" in notice.message


# --- what the operator and the intake may do meanwhile ------------------------------


def test_a_report_that_cannot_be_sent_loses_no_state_and_is_sent_later(make_queue):
    q = make_queue()
    q.intake.fail_with = RuntimeError("DKIM key broken")
    q.deliverer.respond = lambda address: BOUNCE if address == "bad@remote.test" else SENT
    queue_id = q.enqueue("bad@remote.test", "bob@remote.test")
    recipients = {r.address: r for r in q.load(queue_id).recipients}
    assert recipients["bob@remote.test"].state == DELIVERED  # kept: bob is not sent to twice
    assert recipients["bad@remote.test"].state == FAILED and not recipients["bad@remote.test"].bounced
    assert q.intake.notices == []
    q.intake.fail_with = None
    q.advance_to(q.load(queue_id).next_attempt)
    assert [calls for _, calls in q.deliverer.calls] == [["bad@remote.test", "bob@remote.test"]]
    assert q.intake.kinds() == ["failure"] and not q.is_queued(queue_id)


def test_a_hold_said_during_an_attempt_is_kept(make_queue):
    q = make_queue()
    held: list = []
    original = q.deliverer.deliver

    def deliver_and_hold(envelope, message, recipients=None):
        held.append(q.scheduler.set_held(envelope.id, True))  # `mailhost queue hold` while it runs
        return original(envelope, message, recipients)

    q.deliverer.deliver = deliver_and_hold
    queue_id = q.enqueue("slow@remote.test")
    assert held and q.load(queue_id).held
    q.advance_to(START + 3600)
    assert len(q.deliverer.calls) == 1  # held: not tried again


def test_flushing_a_held_message_keeps_it_held(make_queue):
    q = make_queue()
    queue_id = q.enqueue("slow@remote.test")
    q.scheduler.set_held(queue_id, True)
    assert q.scheduler.flush(queue_id) == 0
    q.advance_to(START + 3600)
    assert len(q.deliverer.calls) == 1
    q.scheduler.set_held(queue_id, False)  # released: due at its next_attempt, long past
    assert len(q.deliverer.calls) == 2


def test_deleting_a_message_whose_attempt_delivers_it_is_quiet(make_queue):
    q = make_queue()
    q.deliverer.respond = lambda address: SENT
    original = q.deliverer.deliver
    deletions: list = []

    def deliver_and_delete(envelope, message, recipients=None):
        deletions.append(q.scheduler.delete(envelope.id))  # `mailhost queue delete` while it runs
        return original(envelope, message, recipients)

    q.deliverer.deliver = deliver_and_delete
    errors: list = []
    observer = lambda event: errors.append(event) if "log_failure" in event or "failure" in event else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        queue_id = q.enqueue("bob@remote.test")
        other = q.enqueue("carol@remote.test")  # the scheduler goes on with the next one
        gc.collect()  # an unhandled error in a Deferred is reported when it is collected
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not q.is_queued(queue_id) and not q.is_queued(other)
    assert all(d.called for d in deletions)
    assert queue_id not in q.scheduler.in_flight
    assert errors == []


# --- corrupt envelopes -------------------------------------------------------------------


def restarted(q: Queue, recover_spool: bool = True) -> tuple[Scheduler, list[dict]]:
    """A new scheduler over the same spool, as at the daemon's next start; and what it logged."""
    q.scheduler.stopService()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        scheduler = Scheduler(q.config, q.spool, SyncWriter(), q.deliverer, q.intake, q.clock, Metrics(), EVERYTHING,
                              q.scheduler.suppression, recover_spool=recover_spool)
        scheduler.startService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    q.scheduler = scheduler
    return scheduler, events


def plant(spool: Spool, text: bytes) -> str:
    queue_id = new_queue_id()
    for path, data in ((spool.envelope_path(queue_id), text), (spool.message_path(queue_id), MESSAGE)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return queue_id


def errors(events: list[dict]) -> list[str]:
    from twisted.logger import LogLevel, formatEvent

    return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]


def test_corrupt_envelopes_are_set_aside_at_start_and_the_rest_is_delivered(make_queue):
    q = make_queue()
    good = q.enqueue("bob@remote.test", due_in=3600)
    bad = {plant(q.spool, text): text for text in (b"", b'{"id": "x", "sender": "a@b', b"\x00\xffgarbage",
                                                     b'{"id": "wrong", "sender": "", "recipients": [], '
                                                     b'"arrival": 1, "next_attempt": 1}')}
    scheduler, events = restarted(q)
    corrupt = q.spool.root / "corrupt"
    assert sorted(p.name for p in corrupt.iterdir()) == sorted([*bad, *(f"{i}.json" for i in bad)])
    assert all((corrupt / f"{i}.json").read_bytes() == text for i, text in bad.items())
    lines = errors(events)
    assert len(lines) == 4 and all(any(line.startswith(f"{i}: corrupt envelope (") for line in lines) for i in bad)
    assert any("(empty file)" in line for line in lines)
    assert list(q.spool.ids()) == [good] and len(scheduler.index) == 1
    assert scheduler.metrics.registry.get_sample_value("mailhost_queue_corrupt") == 4
    q.deliverer.respond = lambda address: SENT
    q.advance_to(START + 3600)
    assert not q.is_queued(good)


def test_a_worker_sets_aside_the_corrupt_envelopes_of_its_own_shard(make_queue):
    """Only the main process cleans up interrupted writes, but a corrupt envelope is its owner's to move."""
    q = make_queue()
    bad = plant(q.spool, b"")
    scheduler, events = restarted(q, recover_spool=False)
    assert (q.spool.root / "corrupt" / f"{bad}.json").exists()
    assert len(errors(events)) == 1
    # Counted by the main process only (the workers' figures are added to its own).
    assert scheduler.metrics.registry.get_sample_value("mailhost_queue_corrupt") == 0


def test_an_envelope_that_turns_corrupt_in_the_queue_is_set_aside_when_due(make_queue):
    q = make_queue()
    queue_id = q.enqueue("bob@remote.test", due_in=60)
    q.spool.envelope_path(queue_id).write_bytes(b'{"id": "' + queue_id.encode() + b'", "sender": 5}')
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        q.advance_to(START + 60)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert q.deliverer.calls == []
    assert (q.spool.root / "corrupt" / queue_id).read_bytes() == MESSAGE
    [line] = errors(events)
    assert line.startswith(f"{queue_id}: corrupt envelope (") and queue_id not in q.scheduler.index


def test_hold_and_release_are_logged(make_queue):
    from twisted.logger import capturedLogs, formatEvent

    q = make_queue()
    queue_id = q.enqueue("bob@remote.test", due_in=3600)
    with capturedLogs() as events:
        q.scheduler.set_held(queue_id, True)
        q.scheduler.set_held(queue_id, False)
    assert [formatEvent(e) for e in events] == [f"{queue_id}: held by the operator", f"{queue_id}: released by the operator"]


def test_outcomes_decided_here_are_logged_as_the_deliverer_logs_its_own(make_queue):
    from twisted.logger import capturedLogs, formatEvent

    q = make_queue()
    q.suppression.add("bob@remote.test", "5.1.1", "a bounce", source="bounce")
    with capturedLogs() as events:
        queue_id = q.enqueue("bob@remote.test")
    lines = [formatEvent(e) for e in events if "to=<" in formatEvent(e)]
    assert len(lines) == 1 and lines[0].startswith(f"{queue_id}: to=<bob@remote.test> relay=none tls=none delay=0.00 "
                                                   "dsn=5.7.1 status=failed (recipient suppressed since ")
