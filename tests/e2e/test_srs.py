"""SRS end to end: the real daemon forwards by alias to a remote MX (a sink behind the test
DNS) with an SRS0 return path, and a bounce to that address reaches the original sender's MX."""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailhost.feedback.srs import Srs
from tests.e2e.conftest import RawSession, free_port
from tests.e2e.test_sending import wait_for
from tests.support.dns import DNSServer
from tests.support.peers import Sink

MX_PORT = free_port()

ZONE = [
    ("remote.test", "MX", "10 mx1.remote.test"),
    ("mx1.remote.test", "A", "127.0.0.5"),
    ("sender.example", "MX", "10 mx.sender.example"),
    ("mx.sender.example", "A", "127.0.0.6"),
]

DOMAINS = """
[[domain]]
name = "example.test"
maildir = "mail/example.test"
users = "users"
[domain.aliases]
fwd = ["bob@remote.test"]
fwdfail = ["gone@remote.test"]
"""


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE) as server:
        yield server


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[Callable[..., Sink]]:
    started: list[Sink] = []

    def start(address: str, **options) -> Sink:
        sink = Sink(tmp_path / f"sink-{address}", address=address, port=MX_PORT, **options)
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


def forwarding_daemon(make_daemon, dns: DNSServer):
    # 127.0.0.1 is not in relay.networks here: the test client is "the internet". VERP on: an
    # SRS return path is left alone by it (its bounces are the original sender's, not ours).
    extra = f'nameservers = ["{dns.nameserver}"]\nmx_port = {MX_PORT}\nverp = true\n[queue]\nretry = ["1s"]\n'
    return make_daemon(extra=extra, domains=DOMAINS, relay_networks='["127.0.0.3/32"]')


def test_alias_forward_has_an_srs_return_path_and_the_bounce_reaches_the_sender(make_daemon, dns, sinks):
    remote = sinks("127.0.0.5")
    origin = sinks("127.0.0.6")  # the original sender's MX
    daemon = forwarding_daemon(make_daemon, dns)
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.sendmail("x@sender.example", ["fwd@example.test"], b"From: x@sender.example\r\nSubject: fwd\r\n\r\nhi\r\n")
    [got] = wait_for(remote.messages, what="the forwarded copy")
    srs_address = got["mail_from"]
    assert got["rcpt_to"] == ["bob@remote.test"] and "Subject: fwd" in got["data"]
    assert srs_address.startswith("SRS0=") and srs_address.endswith("=sender.example=x@example.test")
    # The key is state_dir/srs.key, owner-only.
    key = daemon.root / "state" / "srs.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert Srs(key.read_bytes()).reverse(srs_address.rpartition("@")[0]) == "x@sender.example"

    # The destination's bounce, from <> to the SRS address (its local part in another case, as relays do).
    local, _, domain = srs_address.rpartition("@")
    session = RawSession(daemon.port)
    try:
        session.command("EHLO mx1.remote.test")
        assert session.command("MAIL FROM:<>").startswith("250")
        assert session.command(f"RCPT TO:<{local.lower()}@{domain}>").startswith("250 2.1.5")
        # Forged (another original sender under the same hash) and garbled ones: 550 5.1.1.
        forged = local.replace("=sender.example=x", "=sender.example=eve")
        assert session.command(f"RCPT TO:<{forged}@{domain}>").startswith("550 5.1.1")
        assert session.command(f"RCPT TO:<SRS0=nonsense@{domain}>").startswith("550 5.1.1")
        assert session.command("DATA").startswith("354")
        session.send(b"From: MAILER-DAEMON@mx1.remote.test\r\nSubject: Undelivered Mail\r\n\r\nbob is gone\r\n.\r\n")
        assert session.reply().startswith("250")
    finally:
        session.close()
    [bounce] = wait_for(origin.messages, what="the bounce at the original sender's MX")
    assert bounce["mail_from"] == "" and bounce["rcpt_to"] == ["x@sender.example"]
    assert "Subject: Undelivered Mail" in bounce["data"]


def test_our_own_bounce_of_forwarded_mail_goes_to_the_original_sender(make_daemon, dns, sinks):
    sinks("127.0.0.5", script=[{"when": "RCPT", "match": "gone@", "reply": "550 5.1.1 no such user"}])
    origin = sinks("127.0.0.6")
    daemon = forwarding_daemon(make_daemon, dns)
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.sendmail("x@sender.example", ["fwdfail@example.test"], b"Subject: to gone\r\n\r\nhi\r\n")
    [dsn] = wait_for(origin.messages, what="our DSN at the original sender's MX")
    assert dsn["mail_from"] == "" and dsn["rcpt_to"] == ["x@sender.example"]
    report = email.message_from_string(dsn["data"], policy=email.policy.default)
    assert report.get_content_type() == "multipart/report" and "gone@remote.test" in dsn["data"]


def test_srs_address_of_a_local_sender_reaches_the_mailbox(make_daemon, dns):
    daemon = forwarding_daemon(make_daemon, dns)
    # What another alias of ours would have made for alice had she not been ours then (the key is the daemon's).
    srs = Srs((daemon.root / "state" / "srs.key").read_bytes())
    address = srs.forward("alice@example.test", "example.test")
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.sendmail("", [address], b"Subject: bounce for alice\r\n\r\nhi\r\n")
    assert [m["Subject"] for m in daemon.messages("alice")] == ["bounce for alice"]
