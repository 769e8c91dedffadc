"""What a refusal does to the queue, end to end inside one process: the real Scheduler,
Deliverer and Throttle on task.Clock, with a scripted remote server (no network).

A policy or authentication block keeps the mail and pauses the destination group; the
other messages for that group wait without an attempt; an unknown user is suppressed; a
full mailbox counts as soft; and the give-up limits (queue.max_attempts,
queue.marketing_lifetime) return the mail saying which limit it reached.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from mailhost.config import load
from mailhost.delivery.deliverer import Deliverer
from mailhost.delivery.routing import Hop, Route
from mailhost.delivery.scheduler import Scheduler
from mailhost.delivery.throttle import Throttle
from mailhost.feedback.suppression import SuppressionList
from mailhost.multiproc.shard import EVERYTHING
from mailhost.ops.metrics import Metrics
from mailhost.queue.envelope import DEFERRED, Envelope, Recipient
from mailhost.queue.spool import Spool, SpoolError, new_queue_id
from mailhost.smtp.client import SendResult
from mailhost.smtp.wire import Reply

from tests.delivery.test_scheduler import MESSAGE, FakeIntake, SyncWriter

START = 1_700_000_000.0

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
retry = ["1m"]
delay_warning = "0"
{queue}

[bounces]
block_pause = "15m"
soft_limit = 2

[unsubscribe]
senders = ["@news.example.test"]
"""

DMARC = Reply(550, "5.7.26", "Unauthenticated email from example.test is not accepted due to domain's DMARC policy")
UNKNOWN = Reply(550, "5.1.1", "The email account that you tried to reach does not exist")
FULL = Reply(552, "5.2.2", "The recipient's inbox is out of storage space")
OK = Reply(250, "2.0.0", "OK")
DEFERRAL = Reply(451, "4.3.0", "Mail server temporarily rejected message")


class Router:
    def route(self, domain: str) -> defer.Deferred:
        return defer.succeed(Route((Hop("gmail-smtp-in.l.google.com", ("192.0.2.1",), 25, 5),)))


class Session:
    usable = True
    tls_version = None

    def __init__(self, server: Server) -> None:
        self.server = server

    def send(self, sender: str, recipients: list[str], message: bytes, body_written: Any = None,
             **options: Any) -> defer.Deferred:
        self.server.transactions.append(list(recipients))
        if body_written is not None:
            body_written()
        return defer.succeed(SendResult({r: self.server.answer(r) for r in recipients}))

    def abort(self) -> None:
        pass

    def quit(self) -> None:
        pass


class Server:
    """The remote MX and our session pool to it: `answer(rcpt)` is its reply."""

    def __init__(self) -> None:
        self.transactions: list[list[str]] = []
        self.answer: Callable[[str], Reply] = lambda rcpt: OK

    def take(self, *args: Any) -> defer.Deferred:
        return defer.succeed(Session(self))

    def give_back(self, hop: Hop, address: str, session: Session, hop_tls: Any = None) -> None:
        pass

    def close_all(self) -> None:
        pass

    def tried(self) -> list[str]:
        return [r for t in self.transactions for r in t]


class Queue:
    def __init__(self, tmp_path: Path, queue: str = "") -> None:
        (tmp_path / "mailhost.toml").write_text(CONFIG.format(queue=queue))
        self.config = load(tmp_path / "mailhost.toml")
        self.clock = task.Clock()
        self.clock.advance(START)
        self.spool = Spool(tmp_path / "spool")
        self.server = Server()
        self.metrics = Metrics()
        self.throttle = Throttle(self.config.throttles, 10, clock=self.clock.seconds)
        deliverer = Deliverer(self.config, Router(), self.server, self.throttle, self.clock, self.metrics)
        self.intake = FakeIntake()
        self.suppression = SuppressionList(tmp_path / "suppression.json", soft_limit=2)
        self.scheduler = Scheduler(self.config, self.spool, SyncWriter(), deliverer, self.intake, self.clock,
                                   self.metrics, EVERYTHING, self.suppression)
        self.scheduler.startService()

    def enqueue(self, *recipients: str, sender: str = "alice@example.test") -> str:
        now = self.clock.seconds()
        envelope = Envelope(new_queue_id(), sender, [Recipient(r) for r in recipients], now, now)
        self.spool.store(envelope, [MESSAGE])
        self.scheduler.queued(envelope)
        return envelope.id

    def load(self, queue_id: str) -> Envelope:
        return self.spool.load(queue_id)

    def is_queued(self, queue_id: str) -> bool:
        try:
            self.spool.load(queue_id)
            return True
        except SpoolError:
            return False

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def make(tmp_path: Path):
    made: list[Queue] = []

    def build(queue: str = "") -> Queue:
        made.append(Queue(tmp_path, queue))
        return made[-1]

    yield build
    for q in made:
        q.scheduler.stopService()


@pytest.fixture
def warnings():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def test_an_authentication_block_keeps_the_mail_and_pauses_the_group(make, warnings):
    q = make()
    q.server.answer = lambda rcpt: DMARC
    first = q.enqueue("bob@gmail.com")
    [bob] = q.load(first).recipients
    assert (bob.state, bob.attempts, bob.status) == (DEFERRED, 1, "5.7.26")  # kept, not bounced
    assert q.intake.notices == []
    assert q.suppression.entries() == []  # the recipient is fine; the sender is not
    pace = q.throttle.pace_for("gmail-smtp-in.l.google.com")
    assert pace.rate == pace.floor and pace.paused_for() == 900.0

    # The rest of the campaign for that group waits, without an attempt.
    q.server.answer = lambda rcpt: OK
    others = [q.enqueue(f"user{n}@googlemail.com") for n in range(5)]
    assert q.server.tried() == ["bob@gmail.com"]
    for queue_id in others:
        [recipient] = q.load(queue_id).recipients
        assert recipient.attempts == 0 and q.load(queue_id).next_attempt == START + 900.0

    # The log line and the metric say who blocked what, and why.
    [line] = [e for e in warnings if "blocks our mail" in e.get("log_format", "")]
    assert (line["group"], line["category"]) == ("google", "authentication") and "5.7.26" in line["reply"]
    assert q.metric("mailhost_blocks_total", group="google", **{"class": "authentication"}) == 1.0
    assert q.metric("mailhost_bounces_total", kind="permanent", **{"class": "authentication"}) == 1.0

    # After the pause they go, at the floor's pace (10/min for Google: one each 6 s).
    q.clock.pump([1.0] * 1000)
    assert not any(q.is_queued(queue_id) for queue_id in [first, *others])
    assert sorted(q.server.tried()[1:]) == ["bob@gmail.com", *(f"user{n}@googlemail.com" for n in range(5))]


def test_a_block_bounces_only_when_the_message_runs_out_of_attempts(make):
    q = make('max_attempts = 3')
    q.server.answer = lambda rcpt: DMARC
    queue_id = q.enqueue("bob@gmail.com")
    q.clock.pump([60.0] * 60)  # tried at 0, 15 and 30 minutes: each block pauses the group again
    assert not q.is_queued(queue_id) and q.server.tried() == ["bob@gmail.com"] * 3
    [notice] = q.intake.notices
    assert notice.kind == "failure" and notice.statuses == ["4.4.7"]
    assert b"gave up after 3 failed attempts (queue.max_attempts = 3)" in words(notice.message)
    assert q.suppression.entries() == []


def test_an_unknown_user_is_suppressed_with_its_class_and_reply(make):
    q = make()
    q.server.answer = lambda rcpt: UNKNOWN
    q.enqueue("gone@gmail.com")
    entry = q.suppression.is_suppressed("gone@gmail.com")
    assert (entry.category, entry.status, entry.source) == ("invalid_recipient", "5.1.1", "bounce")
    assert "does not exist" in entry.reason
    assert q.throttle.pace_for("gmail-smtp-in.l.google.com").paused_for() == 0.0
    assert q.intake.kinds() == ["failure"]


def test_a_full_mailbox_counts_as_soft_until_the_limit(make):
    q = make()
    q.server.answer = lambda rcpt: FULL
    q.enqueue("full@gmail.com")
    assert q.suppression.is_suppressed("full@gmail.com") is None
    assert q.suppression.soft_count("full@gmail.com") == 1
    q.clock.advance(1.0)  # the next send slot of the group
    q.enqueue("full@gmail.com")  # soft_limit = 2
    q.clock.advance(1.0)
    entry = q.suppression.is_suppressed("full@gmail.com")
    assert entry.category == "mailbox_full" and entry.reason.startswith("2 soft bounces in 7 days")


def test_marketing_mail_gives_up_after_its_own_lifetime(make):
    q = make('lifetime = "5d"\nmarketing_lifetime = "1h"')
    q.server.answer = lambda rcpt: DEFERRAL
    offer = q.enqueue("bob@gmail.com", sender="offers@news.example.test")
    letter = q.enqueue("bob@gmail.com")
    q.clock.pump([60.0] * 61)
    assert not q.is_queued(offer) and q.is_queued(letter)
    notice = q.intake.notices[0]
    assert b"not delivered within 1h (queue.marketing_lifetime)" in words(notice.message)
    assert q.load(letter).recipients[0].state == DEFERRED


def test_max_attempts_returns_plain_deferrals_too(make):
    q = make("max_attempts = 2")
    q.server.answer = lambda rcpt: DEFERRAL
    queue_id = q.enqueue("bob@gmail.com")
    q.clock.advance(60.0)
    assert not q.is_queued(queue_id)
    assert [n.kind for n in q.intake.notices] == ["failure"]
    assert b"gave up after 2 failed attempts" in words(q.intake.notices[0].message)


def words(message: bytes) -> bytes:
    """The DSN's text with its line wrapping undone."""
    return b" ".join(message.split())


def test_a_full_mailbox_deferred_again_and_again_counts_once_per_message(make):
    q = make()
    q.server.answer = lambda rcpt: Reply(452, "4.2.2", "The email account that you tried to reach is over quota")
    queue_id = q.enqueue("full@gmail.com")
    q.clock.pump([60.0] * 40)  # tried at 0, 1, 6, 21 and 51 minutes: one message, one soft bounce
    assert q.load(queue_id).recipients[0].attempts >= 4
    assert q.suppression.soft_count("full@gmail.com") == 1
    assert q.suppression.is_suppressed("full@gmail.com") is None
