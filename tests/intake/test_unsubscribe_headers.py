"""The intake's unsubscribe step: RFC 8058 headers on our marketing senders' mail, from every
door, and mail to unsubscribe+TOKEN addresses consumed (mailhost.intake.cleanup)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from mailhost.authn.dkim import Signer
from mailhost.config import load
from mailhost.feedback.suppression import SuppressionList
from mailhost.feedback.unsubscribe import KEY_BYTES, UnsubscribeTokens
from mailhost.intake.cleanup import Incoming, Intake, signed_body
from mailhost.intake.policy import RecipientVerdict
from mailhost.intake.origin import DSN, SENDMAIL, SMTP, Origin
from mailhost.local.mailbox import LocalDomains
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
team = ["bob@remote.test"]
[http]
endpoint = "tcp:8443:interface=127.0.0.1"
{public_url}
[unsubscribe]
add_headers = {add}
senders = ["news@example.test", "@client.example"]
"""

TOKENS = UnsubscribeTokens(b"k" * KEY_BYTES)
RELAY_NETWORK = Origin(SMTP, role="mx", client_ip="127.0.0.1", helo="app", relay_network=True)
OUTSIDE = Origin(SMTP, role="mx", client_ip="192.0.2.1", helo="mx.other")
SUBMISSION = Origin(SMTP, role="submission", client_ip="192.0.2.9", helo="pc", user="news@example.test", tls="TLSv1.3")


class RecordingIntake(Intake):
    stored: list[bytes]

    def store(self, copies: list, envelope: Any, outbound_headers: bytes, body: bytes,
              signing_key: Any = None) -> defer.Deferred:
        body = signed_body(body, signing_key)
        self.stored.append(body)
        return defer.succeed(None)


def make_intake(tmp_path: Path, add: bool = True, public_url: str = "") -> RecordingIntake:
    (tmp_path / "mailhost.toml").write_text(CONFIG.format(add=str(add).lower(), public_url=public_url))
    (tmp_path / "users").write_text("")
    config = load(tmp_path / "mailhost.toml")
    suppression = SuppressionList(tmp_path / "suppression.json")
    intake = RecordingIntake(config, None, None, LocalDomains(config), Signer(tmp_path), suppression,
                             lambda f, *a: defer.maybeDeferred(f, *a), EVERYTHING, unsubscribe=TOKENS)
    intake.stored = []
    return intake


def receive(intake: RecordingIntake, origin: Origin, sender: str, recipients: list[str], message: bytes) -> bytes:
    results: list[Any] = []
    intake.receive(Incoming(sender, recipients, message), origin).addBoth(results.append)
    assert not isinstance(results[0], Exception) and not hasattr(results[0], "raiseException"), results
    return intake.stored[-1] if intake.stored else b""


def verdict(intake: RecordingIntake, address: str) -> RecipientVerdict:
    return intake.recipient_verdict(parse_path(f"<{address}>", utf8=True, null_ok=False, kind="recipient")[0], OUTSIDE)


MESSAGE = b"From: news@example.test\nTo: bob@remote.test\nSubject: offer\nDate: x\nMessage-ID: <1@x>\n\nhi\n"


@pytest.mark.parametrize("origin", [RELAY_NETWORK, SUBMISSION, Origin(SENDMAIL, submitter="userid 0")])
def test_marketing_mail_to_one_recipient_gets_both_headers(tmp_path: Path, origin: Origin) -> None:
    stored = receive(make_intake(tmp_path), origin, "news@example.test", ["bob@remote.test"], MESSAGE)
    head = stored.split(b"\n\n")[0].decode()
    assert "List-Unsubscribe: <https://mail.example.test:8443/unsubscribe/1h" in head
    assert "<mailto:unsubscribe+1m" in head and "@example.test>" in head
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in head
    link = head.split("/unsubscribe/")[1].split(">")[0]
    assert TOKENS.verify(link).recipient == "bob@remote.test" and TOKENS.verify(link).scope == "example.test"


def test_from_header_counts_and_the_scope_is_the_envelope_senders_domain(tmp_path: Path) -> None:
    message = MESSAGE.replace(b"From: news@example.test", b"From: Offers <offers@client.example>")
    stored = receive(make_intake(tmp_path, public_url='public_url = "https://mail.example.org"'), RELAY_NETWORK,
                     "bounce@app.example", ["bob@remote.test"], message)
    link = stored.split(b"https://mail.example.org/unsubscribe/")[1].split(b">")[0].decode()
    assert TOKENS.verify(link).scope == "app.example"  # what RCPT checks a scoped entry against
    assert b"@example.test>" in stored  # the mailto goes to a domain of ours


@pytest.mark.parametrize("case", ["outside", "two recipients", "has one", "not marketing", "off", "null sender", "dsn"])
def test_no_headers(tmp_path: Path, case: str) -> None:
    intake = make_intake(tmp_path, add=case != "off")
    origin, sender, recipients, message = RELAY_NETWORK, "news@example.test", ["bob@remote.test"], MESSAGE
    if case == "outside":
        origin, recipients = OUTSIDE, ["team@example.test"]
    elif case == "two recipients":
        recipients = ["bob@remote.test", "carol@remote.test"]  # one link would unsubscribe the other
    elif case == "has one":
        message = b"List-Unsubscribe: <https://crm.example/u/1>\n" + MESSAGE
    elif case == "not marketing":
        sender, message = "alice@example.test", MESSAGE.replace(b"news@", b"alice@")
    elif case == "null sender":
        sender = ""
    elif case == "dsn":
        origin = Origin(DSN)
    stored = receive(intake, origin, sender, recipients, message)
    assert b"\n\nhi\n" in stored
    assert stored.count(b"List-Unsubscribe:") == (1 if case == "has one" else 0)
    assert b"List-Unsubscribe-Post" not in stored


def test_mail_to_an_unsubscribe_address_is_consumed(tmp_path: Path) -> None:
    intake = make_intake(tmp_path)
    token = TOKENS.mailto_token("bob@remote.test", "news@example.test", "example.test")
    address = f"unsubscribe+{token}@example.test"
    assert verdict(intake, address).accepted
    assert receive(intake, OUTSIDE, "bob@remote.test", [address], b"Subject: unsubscribe\n\n") == b""
    entry = intake.suppression.is_suppressed("bob@remote.test", "news@example.test")
    assert (entry.source, entry.scope) == ("unsubscribe", "example.test")
    assert intake.suppression.is_suppressed("bob@remote.test", "other@elsewhere.example") is None
    bad = verdict(intake, f"unsubscribe+{token[:-1]}q@example.test")
    assert (bad.reply.code, bad.reply.status) == (550, "5.1.1")
