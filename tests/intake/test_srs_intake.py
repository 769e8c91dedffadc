"""SRS in the one intake path (mailhost.intake.cleanup, intake.policy): which envelopes get
an SRS return path, and which SRS recipients are taken at RCPT and where they go."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from mailhost.authn.dkim import Signer
from mailhost.config import load
from mailhost.feedback.suppression import SuppressionList
from mailhost.intake.cleanup import Incoming, Intake
from mailhost.intake.origin import DSN, SMTP, Origin
from mailhost.feedback.srs import KEY_BYTES, Srs
from mailhost.local.mailbox import LocalDomains
from mailhost.local.users import UserEntry, write_users
from mailhost.multiproc.shard import EVERYTHING
from mailhost.smtp.wire import parse_path

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
[domain.aliases]
fwd = ["bob@remote.test"]
mixed = ["alice", "carol@remote.test"]
[[domain]]
name = "other.test"
maildir = "mail/other.test"
users = "users"
[domain.aliases]
fwd = ["dave@remote.test"]
{extra}
"""

SRS = Srs(b"k" * KEY_BYTES)
OUTSIDE = Origin(SMTP, role="mx", client_ip="192.0.2.1", helo="mx.sender.example")
RELAY_NETWORK = Origin(SMTP, role="mx", client_ip="127.0.0.1", helo="app", relay_network=True)
MESSAGE = b"From: x@sender.example\nSubject: hi\n\nhello\n"


class RecordingIntake(Intake):
    def store(self, copies: list, envelope: Any, outbound_headers: bytes, body: bytes,
              signing_key: Any = None) -> defer.Deferred:
        self.envelopes += [envelope] if envelope is not None else []
        self.copies += [c.mailbox.address for c in copies]
        return defer.succeed(None)


def make_intake(tmp_path: Path, extra: str = "") -> RecordingIntake:
    (tmp_path / "mailhost.toml").write_text(CONFIG.format(extra=extra))
    write_users(tmp_path / "users", {a: UserEntry(a, "x") for a in ("alice@example.test",)})
    config = load(tmp_path / "mailhost.toml")
    intake = RecordingIntake(config, None, None, LocalDomains(config), Signer(tmp_path),
                             SuppressionList(tmp_path / "suppression.json"), lambda f, *a: defer.maybeDeferred(f, *a),
                             EVERYTHING, srs=SRS)
    intake.envelopes, intake.copies = [], []
    return intake


def receive(intake: RecordingIntake, origin: Origin, sender: str, recipients: list[str]) -> Any:
    results: list[Any] = []
    intake.receive(Incoming(sender, recipients, MESSAGE), origin).addBoth(results.append)
    return results[0]


def senders(intake: RecordingIntake) -> dict[str, list[str]]:
    return {e.sender: sorted(r.address for r in e.recipients) for e in intake.envelopes}


def test_alias_forward_gets_an_srs0_return_path_in_the_aliass_domain(tmp_path):
    intake = make_intake(tmp_path)
    receipt = receive(intake, OUTSIDE, "x@sender.example", ["fwd@example.test"])
    [(sender, rcpts)] = senders(intake).items()
    assert rcpts == ["bob@remote.test"] and sender.startswith("SRS0=") and sender.endswith("=sender.example=x@example.test")
    assert SRS.reverse(sender.rpartition("@")[0]) == "x@sender.example"
    assert receipt.queued == 1 and intake.envelopes[0].id == receipt.queue_id


def test_direct_relay_keeps_its_sender_and_the_forward_has_its_own_envelope(tmp_path):
    intake = make_intake(tmp_path)
    receipt = receive(intake, RELAY_NETWORK, "x@sender.example", ["mixed@example.test", "zed@remote.test"])
    found = senders(intake)
    assert found.pop("x@sender.example") == ["zed@remote.test"]
    [(sender, rcpts)] = found.items()
    assert sender.startswith("SRS0=") and rcpts == ["carol@remote.test"]
    assert intake.copies == ["alice@example.test"] and receipt.queued == 2
    assert len({e.id for e in intake.envelopes}) == 2


@pytest.mark.parametrize("sender", ["", "alice@example.test", "someone@other.test"])
def test_no_rewriting_for_bounces_and_our_own_senders(tmp_path, sender):
    intake = make_intake(tmp_path)
    receive(intake, RELAY_NETWORK, sender, ["fwd@example.test"])
    assert senders(intake) == {sender: ["bob@remote.test"]}


def test_srs_off_keeps_the_sender(tmp_path):
    intake = make_intake(tmp_path, "[srs]\nenabled = false")
    receive(intake, OUTSIDE, "x@sender.example", ["fwd@example.test"])
    assert senders(intake) == {"x@sender.example": ["bob@remote.test"]}


def verdict(intake: Intake, address: str, origin: Origin = OUTSIDE):
    return intake.recipient_verdict(parse_path(f"<{address}>", utf8=True, null_ok=False, kind="recipient")[0], origin)


def test_rcpt_to_a_valid_srs_address_relays_to_the_original_sender_from_anyone(tmp_path):
    intake = make_intake(tmp_path)
    address = SRS.forward("x@sender.example", "example.test")
    got = verdict(intake, address)
    assert got.reply.code == 250 and got.resolution.remote == ["x@sender.example"]
    assert verdict(intake, address.lower()).resolution.remote == ["x@sender.example"]
    # The bounce itself is relayed from <> through the one path, its SRS address undone.
    receive(intake, OUTSIDE, "", [address])
    assert senders(intake) == {"": ["x@sender.example"]}


def test_srs_address_of_a_local_sender_goes_to_its_mailbox(tmp_path):
    intake = make_intake(tmp_path)
    got = verdict(intake, SRS.forward("alice@example.test", "other.test"))
    assert got.reply.code == 250 and [m.address for m in got.resolution.mailboxes] == ["alice@example.test"]


@pytest.mark.parametrize("address", [
    "SRS0=AAAAAA=RA=sender.example=x@example.test",  # forged hash
    "SRS0=garbage@example.test",
    "srs1=x=y@example.test",
])
def test_forged_srs_addresses_get_550_5_1_1(tmp_path, address):
    got = verdict(make_intake(tmp_path), address)
    assert (got.reply.code, got.reply.status) == (550, "5.1.1") and "SRS" in got.reply.text


def test_our_dsn_about_forwarded_mail_goes_back_to_the_original_sender(tmp_path):
    intake = make_intake(tmp_path)
    address = SRS.forward("x@sender.example", "example.test")
    receive(intake, Origin(DSN), "", [address])
    assert senders(intake) == {"": ["x@sender.example"]}
