"""Complaint reports through the one intake path, and the Feedback-ID: fix-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from mailhost.authn.dkim import Signer
from mailhost.config import load
from mailhost.feedback.complaints import ComplaintRate
from mailhost.feedback.events import EventLog
from mailhost.feedback.suppression import SuppressionList, verp_sender
from mailhost.intake.cleanup import Incoming, Intake, signed_body
from mailhost.intake.origin import SENDMAIL, SMTP, Origin
from mailhost.local.mailbox import LocalDomains
from mailhost.local.users import UserEntry, write_users
from mailhost.multiproc.shard import EVERYTHING
from mailhost.smtp.wire import parse_path
from tests.support.arf import arf_report, jmrp_report

CONFIG = """
[server]
hostname = "mail.example.test"
state_dir = "state"

[[listener]]
role = "mx"
endpoint = "tcp:2525:interface=127.0.0.1"

[relay]
nameservers = ["127.0.0.1:9"]
verp = true

[inbound]
authenticate = false

[bounces]
consume = {consume}

[feedback]
addresses = ["fbl@example.test"]

[unsubscribe]
{unsubscribe}

[[domain]]
name = "example.test"
users = "users"
"""

OUTSIDE = Origin(SMTP, role="mx", client_ip="192.0.2.1", helo="fbl.provider.test")


class StoringIntake(Intake):
    """The real intake, remembering what it would store instead of writing it."""

    def store(self, copies: list, envelope: Any, outbound_headers: bytes, body: bytes,
              signing_key: Any = None) -> defer.Deferred:
        body = signed_body(body, signing_key)
        self.stored.append((copies, envelope, body))
        return defer.succeed(None)


def make_intake(tmp_path: Path, consume: bool = True, unsubscribe: str = "") -> StoringIntake:
    path = tmp_path / "mailhost.toml"
    path.write_text(CONFIG.format(consume=str(consume).lower(), unsubscribe=unsubscribe))
    write_users(tmp_path / "users", {"alice@example.test": UserEntry("alice@example.test", "x")})
    config = load(path)
    state = tmp_path / "state"
    events = EventLog(state / "events")
    suppression = SuppressionList(state / "suppression.json", events=events)
    intake = StoringIntake(config, None, None, LocalDomains(config), Signer(state), suppression,
                           lambda f, *a: defer.maybeDeferred(f, *a), EVERYTHING,
                           complaint_rate=ComplaintRate(state / "complaints.json"))
    intake.stored = []
    return intake


def receive(intake: Intake, recipients: list[str], message: bytes, origin: Origin = OUTSIDE,
            sender: str = "feedback@fbl.provider.test"):
    results: list = []
    intake.receive(Incoming(sender, recipients, message), origin).addBoth(results.append)
    [result] = results
    if isinstance(result, Exception) or hasattr(result, "raiseException"):
        result.raiseException()
    return result


def test_report_at_the_feedback_address_suppresses_and_is_consumed(tmp_path):
    intake = make_intake(tmp_path)
    assert intake.recipient_verdict(parse_path("<fbl@example.test>", utf8=False, null_ok=False, kind="recipient")[0], OUTSIDE).accepted  # no mailbox needed
    receipt = receive(intake, ["fbl@example.test"], arf_report())
    assert receipt.suppressed == ["bob@yahoo.test"] and receipt.local == 0
    assert intake.stored == []  # consumed: nothing to store
    entry = intake.suppression.is_suppressed("bob@yahoo.test", "someone@other.test")
    assert (entry.source, entry.category, entry.scope) == ("complaint", "complaint", "")
    assert "Yahoo!-Mail-Feedback/2.0" in entry.reason
    [complained] = [e for e in intake.suppression.events.read() if e["event"] == "complained"]
    assert complained["recipient"] == "bob@yahoo.test" and complained["sender"] == "news@example.test"
    assert complained["message_id"] == "campaign-1.1@example.test" and complained["feedback_type"] == "abuse"
    assert complained["provider"] == "yahoo.test"
    assert intake.complaint_rate.rates()["yahoo.test"].total_complaints == 1


def test_report_again_counts_once(tmp_path):
    intake = make_intake(tmp_path)
    receive(intake, ["fbl@example.test"], arf_report())
    receipt = receive(intake, ["fbl@example.test"], arf_report())
    assert receipt.suppressed == []
    assert intake.complaint_rate.rates()["yahoo.test"].total_complaints == 1


def test_report_at_a_verp_address_is_consumed(tmp_path):
    intake = make_intake(tmp_path)
    path = verp_sender("example.test", "carol@hotmail.test")
    receipt = receive(intake, [path], jmrp_report(return_path=path))
    assert receipt.suppressed == ["carol@hotmail.test"] and intake.stored == []


def test_report_to_postmaster_is_taken_and_delivered(tmp_path):
    intake = make_intake(tmp_path)
    receipt = receive(intake, ["postmaster@example.test"], jmrp_report())
    assert receipt.suppressed == ["carol@hotmail.test"] and receipt.local == 1
    assert intake.suppression.is_suppressed("carol@hotmail.test").source == "complaint"


def test_without_consume_the_feedback_address_delivers_to_postmaster(tmp_path):
    intake = make_intake(tmp_path, consume=False)
    receipt = receive(intake, ["fbl@example.test"], arf_report())
    assert receipt.suppressed == ["bob@yahoo.test"]
    [(copies, _, _)] = intake.stored
    assert [c.mailbox.address for c in copies] == ["postmaster@example.test"]


def test_other_mail_to_the_feedback_address_is_delivered(tmp_path):
    intake = make_intake(tmp_path)
    receipt = receive(intake, ["fbl@example.test"], b"From: cfl@provider.test\nSubject: confirm your FBL\n\nclick\n")
    assert receipt.local == 1 and receipt.suppressed == []


@pytest.mark.parametrize("origin", [
    Origin(SMTP, role="mx", client_ip="127.0.0.1", relay_network=True),
    Origin(SMTP, role="submission", client_ip="192.0.2.7", user="alice@example.test", tls="TLSv1.3"),
    Origin(SENDMAIL, submitter="userid 1000"),
])
def test_our_own_senders_cannot_file_complaints(tmp_path, origin):
    intake = make_intake(tmp_path)
    sender = "alice@example.test"
    receipt = receive(intake, ["postmaster@example.test"], arf_report(), origin=origin, sender=sender)
    assert receipt.suppressed == [] and receipt.local == 1
    assert intake.suppression.is_suppressed("bob@yahoo.test") is None


def test_complaint_about_someone_elses_mail_is_not_taken(tmp_path):
    intake = make_intake(tmp_path)
    report = arf_report(return_path="news@shop.test").replace(b"From: Spring News <news@example.test>",
                                                               b"From: Shop <news@shop.test>")
    receipt = receive(intake, ["postmaster@example.test"], report)
    assert receipt.suppressed == [] and receipt.local == 1
    assert intake.suppression.is_suppressed("bob@yahoo.test") is None


def test_feedback_id_added_before_signing(tmp_path):
    intake = make_intake(tmp_path, unsubscribe='feedback_id = "{campaign}:{user}:{sender_domain}:mailhost"')
    origin = Origin(SMTP, role="mx", client_ip="127.0.0.1", relay_network=True)
    message = (b"From: News <news@example.test>\nTo: x@remote.test\nMessage-ID: <1@example.test>\n"
               b"Date: Mon, 20 Jul 2026 09:00:00 +0000\nX-Campaign-ID: spring:2026\r\x0bsale\n\nhi\n")
    receive(intake, ["x@remote.test"], message, origin=origin, sender="news@example.test")
    [(_, envelope, body)] = intake.stored
    assert body.startswith(b"Feedback-ID: spring-2026--sale:news:example.test:mailhost\n")
    # One that is there already is kept as it is.
    intake.stored.clear()
    receive(intake, ["x@remote.test"], b"Feedback-ID: a:b:c:d\n" + message, origin=origin, sender="news@example.test")
    [(_, _, body)] = intake.stored
    assert body.count(b"Feedback-ID:") == 1
