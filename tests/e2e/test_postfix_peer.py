"""Sending to a real Postfix as the receiving MX.

A private Postfix instance (tests/support/postfix.py) listens on
127.0.0.10:<mx port> with a self-signed certificate and stores mail for
user@pfx.test in a Maildir; the test DNS zone makes it pfx.test's MX. mailhost
gets a message from a client in relay.networks and relays it; the test reads it
back from Postfix's Maildir with Python's `mailbox`.
"""

from __future__ import annotations

import email
import email.policy
import json
import mailbox
import os
import shutil
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import free_port
from tests.support import postfix as pf
from tests.support.dns import DNSServer
from tests.support.peers import make_self_signed

ROOT = Path(__file__).resolve().parents[2]
MX_ADDRESS = "127.0.0.10"
RECIPIENT = "user@pfx.test"

# Headers and a body that a careless relay would change: a leading dot (must be
# stuffed on the wire, unstuffed at the other end), trailing white space, a tab,
# a line of exactly one dot, 8-bit UTF-8 text, and a long (but legal) line.
BODY = (
    b"Hello Postfix.\r\n"
    b".a line that starts with a dot\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b"trailing spaces   \r\n"
    b"\ttab-indented\r\n"
    + "caf\u00e9 \u2013 na\u00efve\r\n".encode("utf-8")
    + b"x" * 900 + b"\r\n"
    b"\r\n"
    b"last line\r\n"
)
HEADERS = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: User <user@pfx.test>\r\n"
    b"Subject: to a real Postfix\r\n"
    b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <postfix-peer-1@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"X-Folded: first part\r\n"
    b"  continued\r\n"
)


def _postfix_unavailable() -> str | None:
    reason = pf.unavailable()
    if reason is not None and os.geteuid() == 0 and shutil.which("apt-get"):
        # Same as `make test` does first; covers a bare `pytest` run as root.
        subprocess.run([str(ROOT / "tests" / "ensure-peers")], capture_output=True, timeout=600)
        reason = pf.unavailable()
    return reason


@pytest.fixture
def postfix_mx(tmp_path: Path) -> Iterator[pf.Postfix]:
    reason = _postfix_unavailable()
    if reason is not None:
        pytest.skip(reason)
    cert, key = make_self_signed(tmp_path / "postfix-tls", "mx.pfx.test")
    instance = pf.Postfix(tmp_path / "postfix", listen=f"{MX_ADDRESS}:{free_port(MX_ADDRESS)}",
                          mailboxes=[RECIPIENT], hostname="mx.pfx.test", tls=(cert, key))
    with instance:
        yield instance


def _maildir_messages(instance: pf.Postfix) -> list[bytes]:
    box = mailbox.Maildir(instance.maildir(RECIPIENT), factory=None, create=False)
    return [box.get_bytes(key) for key in box.keys()]


def test_relay_to_a_real_postfix_mx(make_daemon, postfix_mx, tmp_path):
    zone = [("pfx.test", "MX", "10 mx.pfx.test"), ("mx.pfx.test", "A", MX_ADDRESS)]
    with DNSServer(zone) as dns:
        daemon = make_daemon(extra=f'nameservers = ["{dns.nameserver}"]\nmx_port = {postfix_mx.port}\n'
                                   f'[queue]\nretry = ["1s"]\n')
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
            client.ehlo("client.example.test")
            assert client.has_extn("8bitmime")
            refused = client.sendmail("alice@example.test", [RECIPIENT], HEADERS + b"\r\n" + BODY,
                                      mail_options=["BODY=8BITMIME"])
            assert refused == {}

        deadline = time.monotonic() + 15
        while not (got := _maildir_messages(postfix_mx)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert got, f"nothing in Postfix's Maildir; mailhost log:\n{daemon.log()}\nmaillog:\n{postfix_mx.log()}"
        [raw] = got

        # Postfix stores Maildir files with LF line ends; the content is what we sent.
        head, _, body = raw.partition(b"\n\n")
        assert body == BODY.replace(b"\r\n", b"\n")
        for line in HEADERS.replace(b"\r\n  continued", b"\n  continued").split(b"\r\n"):
            if line:
                assert line in head, line

        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert parsed["Subject"] == "to a real Postfix"
        assert parsed["Message-ID"] == "<postfix-peer-1@example.test>"
        assert parsed["Delivered-To"] == RECIPIENT
        assert parsed["Return-Path"] == "<alice@example.test>"
        received = [" ".join(str(r).split()) for r in parsed.get_all("Received")]
        assert len(received) == 2, received
        ours, theirs = received[1], received[0]  # the newest trace header is on top
        assert "by mail.example.test (mailhost)" in ours, ours
        # Postfix's own header: from mailhost (its EHLO name), over TLS, by Postfix.
        assert theirs.startswith("from mail.example.test ("), theirs
        assert "[127.0.0.1]" in theirs, theirs
        assert "by mx.pfx.test (Postfix) with ESMTPS" in theirs, theirs
        assert "(using TLS" in theirs, theirs

        # Postfix offered STARTTLS and mailhost took it (opportunistic, self-signed).
        assert "TLS connection established from localhost[127.0.0.1]" in postfix_mx.log()
        deadline = time.monotonic() + 10
        while json.loads(daemon.cli("queue", "list", "--json").stdout)["messages"]:
            assert time.monotonic() < deadline, "the delivered message is still queued"
            time.sleep(0.1)
        # (logged once mailhost read Postfix's 250, which Postfix may send after its own delivery)
        assert f"relay=mx.pfx.test[{MX_ADDRESS}]" in daemon.log()
