"""Deliverability: DKIM-signed submissions, inbound SPF/DKIM/DMARC, VERP bounces into the suppression list."""

from __future__ import annotations

import email
import email.policy
import smtplib
import ssl
import time

import dkim
import dns.resolver
import pytest

from mailhost.authn.dkim import Signer, generate, sign
from mailhost.feedback.dsn import build_dsn
from mailhost.queue.envelope import FAILED, Envelope, Recipient
from tests.e2e.conftest import RawSession
from tests.e2e.test_sending import MX_PORT, ZONE, sinks, wait_for  # noqa: F401  (fixtures)
from tests.support.dns import DNSServer

PASSWORD = "s3cret-pass"  # what Daemon.seed_users gives every user


@pytest.fixture
def dns_zone():
    """A DNS server whose records a test sets before starting the daemon."""
    server = DNSServer(ZONE).start()
    yield server
    server.stop()


def relay_extra(dns: DNSServer, verp: bool = False, dmarc_reject: bool = False) -> str:
    return (f'nameservers = ["{dns.nameserver}"]\nmx_port = {MX_PORT}\nverp = {str(verp).lower()}\n'
            f'[queue]\nretry = ["1s"]\n[inbound]\ndmarc_reject = {str(dmarc_reject).lower()}\n')


def authenticated_send(daemon, port: int, sender: str, rcpts: list[str], message: bytes) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=context)
        client.login(sender, PASSWORD)
        client.sendmail(sender, rcpts, message)


def add_submission_listener(daemon) -> int:
    from tests.e2e.conftest import free_port

    port = free_port()
    text = daemon.config.read_text()
    marker = f'endpoint = "tcp:{daemon.port}:interface=127.0.0.1"'
    daemon.config.write_text(text.replace(
        marker, f'{marker}\n\n[[listener]]\nrole = "submission"\nendpoint = "tcp:{port}:interface=127.0.0.1"'))
    return port


def dnsfunc(server: DNSServer):
    resolver = dns.resolver.Resolver(configure=False)
    host, _, port = server.nameserver.rpartition(":")
    resolver.nameservers = [host]
    resolver.port = int(port)

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        return b"".join(b"".join(r.strings) for r in resolver.resolve(name.decode().rstrip("."), "TXT"))

    return lookup


CAMPAIGN = (
    b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: Spring news\r\n"
    b"List-Unsubscribe: <mailto:unsub@example.test>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"\r\nHello Bob.\r\n"
)


def test_submitted_mail_leaves_dkim_signed(make_daemon, dns_zone, sinks):
    mx1 = sinks("127.0.0.5")
    daemon = make_daemon(start=False, extra=relay_extra(dns_zone))
    port = add_submission_listener(daemon)
    keygen = daemon.cli("dkim", "keygen", "example.test", "--selector", "s2026")
    record_line = keygen.stdout.splitlines()[-1]
    record = "".join(part for part in record_line.split('"')[1::2])
    dns_zone.update(ZONE + [("s2026._domainkey.example.test", "TXT", record)])
    daemon.start()
    authenticated_send(daemon, port, "alice@example.test", ["bob@remote.test"], CAMPAIGN)
    [got] = wait_for(mx1.messages, what="delivery")
    wire = got["data"].encode("latin-1")
    assert b"DKIM-Signature:" in wire
    assert dkim.verify(wire, dnsfunc=dnsfunc(dns_zone))
    assert not dkim.verify(wire.replace(b"Hello Bob.", b"Hello Eve."), dnsfunc=dnsfunc(dns_zone))
    signature = email.message_from_bytes(wire, policy=email.policy.compat32)["DKIM-Signature"]
    signed = [h.strip().lower() for h in signature.split("h=", 1)[1].split(";", 1)[0].replace("\r\n", "").split(":")]
    assert "list-unsubscribe-post" in signed and signed.count("from") == 2


def inbound(daemon, sender: str, message: bytes, helo: str = "sender.test") -> str:
    """Send from 127.0.0.2 (outside relay.networks) to alice; the reply to DATA."""
    session = RawSession(daemon.port, source="127.0.0.2")
    try:
        session.command(f"EHLO {helo}")
        assert session.command(f"MAIL FROM:<{sender}>").startswith("250")
        assert session.command("RCPT TO:<alice@example.test>").startswith("250")
        assert session.command("DATA").startswith("354")
        session.send(message.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n") + b".\r\n")
        return session.reply()
    finally:
        session.close()


@pytest.mark.parametrize("spf, result", [
    ("v=spf1 ip4:127.0.0.2 -all", "pass"),
    ("v=spf1 ip4:192.0.2.1 -all", "fail"),
    ("v=spf1 ip4:192.0.2.1 ~all", "softfail"),
    (None, "none"),
])
def test_inbound_spf_results(make_daemon, dns_zone, spf, result):
    if spf is not None:
        dns_zone.update(ZONE + [("sender.test", "TXT", spf)])
    daemon = make_daemon(extra=relay_extra(dns_zone))
    reply = inbound(daemon, "news@sender.test", b"From: news@sender.test\nSubject: spf\n\nhi\n")
    assert reply.startswith("250")
    [msg] = daemon.messages("alice")
    assert f"spf={result} smtp.mailfrom=news@sender.test" in msg["Authentication-Results"]
    assert msg["Authentication-Results"].startswith("mail.example.test;")


def test_inbound_dkim_pass_fail_and_forged_results_removed(make_daemon, dns_zone, tmp_path):
    path, record = generate(tmp_path, "sender.test", "k1")
    dns_zone.update(ZONE + [("k1._domainkey.sender.test", "TXT", record), ("sender.test", "TXT", "v=spf1 -all"),
                            ("_dmarc.sender.test", "TXT", "v=DMARC1; p=reject")])
    key = Signer(tmp_path).key_for("sender.test")
    body = (b"From: news@sender.test\nSubject: signed\n"
            b"Authentication-Results: mail.example.test; dkim=pass header.d=bank.test\n\nhello\n")
    signed = sign(body, key) + body
    daemon = make_daemon(extra=relay_extra(dns_zone))
    assert inbound(daemon, "news@sender.test", signed).startswith("250")
    assert inbound(daemon, "news@sender.test", signed.replace(b"hello", b"HELLO")).startswith("250")
    results = sorted((m["Authentication-Results"] for m in daemon.messages("alice")), key=len)
    assert any("dkim=pass header.d=sender.test" in r and "dmarc=pass" in r for r in results)
    assert any("dkim=fail" in r and "dmarc=fail" in r for r in results)
    for message in daemon.messages("alice"):
        # The forged field claiming our hostname is gone; ours is the only one.
        assert len(message.get_all("Authentication-Results")) == 1


def test_dmarc_reject_refuses_when_configured(make_daemon, dns_zone):
    dns_zone.update(ZONE + [("sender.test", "TXT", "v=spf1 -all"), ("_dmarc.sender.test", "TXT", "v=DMARC1; p=reject")])
    daemon = make_daemon(extra=relay_extra(dns_zone, dmarc_reject=True))
    reply = inbound(daemon, "ceo@sender.test", b"From: ceo@sender.test\nSubject: wire money\n\nnow\n")
    assert reply.startswith("550 5.7.1") and "DMARC" in reply
    assert daemon.messages("alice") == []


def test_verp_bounce_suppresses_and_next_rcpt_is_refused(make_daemon, dns_zone, sinks):
    mx1 = sinks("127.0.0.5", script=[{"when": "RCPT", "match": "gone@", "reply": "550 5.1.1 no such user"}])
    daemon = make_daemon(extra=relay_extra(dns_zone, verp=True))
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:  # a relay-network campaign tool
        client.sendmail("alice@example.test", ["bob@remote.test"], CAMPAIGN)
    [got] = wait_for(mx1.messages, what="delivery")
    assert got["mail_from"] == "bounces+bob=remote.test@example.test"
    # The remote side later bounces a message for gone@remote.test to its VERP address.
    now = time.time()
    failed = Recipient("gone@remote.test", state=FAILED, status="5.1.1", last_reply="550 5.1.1 no such user",
                       remote_mta="mx1.remote.test")
    report = build_dsn(Envelope("X", "alice@example.test", [failed], now, now), [failed], CAMPAIGN.replace(b"\r\n", b"\n"),
                       hostname="mx1.remote.test", kind="failure")
    session = RawSession(daemon.port, source="127.0.0.2")
    session.command("EHLO mx1.remote.test")
    session.command("MAIL FROM:<>")
    assert session.command("RCPT TO:<bounces+gone=remote.test@example.test>").startswith("250")
    session.command("DATA")
    session.send(report.replace(b"\n", b"\r\n") + b".\r\n")
    assert session.reply().startswith("250")
    session.close()
    listed = daemon.cli("suppress", "list", "--json").stdout
    assert "gone@remote.test" in listed
    assert all(m.get_content_type() != "multipart/report" for m in daemon.messages("postmaster"))  # consumed
    # The next campaign to that address is refused at RCPT with a reason the tool can record.
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.ehlo()
        client.mail("alice@example.test")
        code, text = client.rcpt("gone@remote.test")
    assert code == 550 and text.startswith(b"5.1.1") and b"suppressed" in text
