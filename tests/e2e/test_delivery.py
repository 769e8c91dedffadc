"""A user's view of receiving: real clients in, Maildir out."""

from __future__ import annotations

import json
import shutil
import smtplib
import socket
import ssl
import subprocess
from email.message import EmailMessage

import pytest

from tests.e2e.conftest import RawSession


def message(to: str, subject: str = "hello", body: str = "Hi there.\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@client.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(body)
    return msg


def send(daemon, rcpts: list[str], subject: str = "hello", body: str = "Hi there.\n", sender: str = "sender@client.test") -> dict:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        return client.send_message(message(", ".join(rcpts), subject, body), from_addr=sender, to_addrs=rcpts)


def test_smtplib_delivery_has_trace_headers(daemon):
    refused = send(daemon, ["alice@example.test"], subject="first")
    assert refused == {}
    [msg] = daemon.messages("alice")
    assert msg["Subject"] == "first"
    assert msg["Return-Path"] == "<sender@client.test>"
    assert msg["Delivered-To"] == "alice@example.test"
    received = msg["Received"]
    assert received.startswith("from ")
    assert "[127.0.0.1]" in received and "by mail.example.test" in received
    assert "with ESMTP id" in received and "for <alice@example.test>;" in received
    # Stored with LF line endings, as Maildir readers expect.
    raw = next((daemon.root / "mail/example.test/alice/new").iterdir()).read_bytes()
    assert b"\r\n" not in raw
    assert "accepted" in daemon.log() and "from=<sender@client.test>" in daemon.log()


def test_swaks_delivery(daemon):
    swaks = shutil.which("swaks")
    assert swaks, "swaks is installed by tests/ensure-peers"
    result = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{daemon.port}", "--to", "alice@example.test", "--from", "s@client.test",
         "--header", "Subject: via swaks"], capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    assert [m["Subject"] for m in daemon.messages("alice")] == ["via swaks"]


def test_swaks_starttls_pipelining(daemon):
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{daemon.port}", "--to", "bob@example.test", "--from", "s@client.test",
         "--tls", "--pipeline", "--header", "Subject: tls"], capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [msg] = daemon.messages("bob")
    assert "with ESMTPS id" in msg["Received"] and "TLSv1." in msg["Received"]


def test_pipelining_in_one_write_gets_every_reply_in_order(raw, daemon):
    session = raw()
    session.send(
        b"EHLO client.test\r\nMAIL FROM:<s@client.test>\r\nRCPT TO:<alice@example.test>\r\n"
        b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    )
    replies = [session.reply() for _ in range(6)]
    assert replies[0].startswith("250-") and "PIPELINING" in replies[0]
    assert [r[:9] for r in replies[1:]] == ["250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5", "354 End d"]
    # The message, the next transaction and QUIT in one more write: the first
    # reply waits on the disk, the rest queue behind it.
    session.send(
        b"Subject: one\r\n\r\nfirst\r\n.\r\nMAIL FROM:<s@client.test>\r\nRCPT TO:<bob@example.test>\r\n"
        b"DATA\r\nSubject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n"
    )
    replies = [session.reply() for _ in range(6)]
    assert [r[:9] for r in replies] == ["250 2.0.0", "250 2.1.0", "250 2.1.5", "354 End d", "250 2.0.0", "221 2.0.0"]
    assert [m["Subject"] for m in daemon.messages("alice")] == ["one"]
    assert sorted(m["Subject"] for m in daemon.messages("bob")) == ["one", "two"]


def test_aliases_expand_and_deduplicate(daemon):
    # "both" = alice + team, "team" = alice + bob: alice gets one copy, not three.
    send(daemon, ["both@example.test", "alice@example.test", "team@example.test"], subject="team news")
    assert [m["Subject"] for m in daemon.messages("alice")] == ["team news"]
    assert [m["Subject"] for m in daemon.messages("bob")] == ["team news"]


def test_alias_to_other_local_domain_and_catch_all(daemon):
    send(daemon, ["support@example.test"], subject="to carol via alias")
    send(daemon, ["whoever@other.test"], subject="caught")
    assert sorted(m["Subject"] for m in daemon.messages("carol", "other.test")) == ["caught", "to carol via alias"]


def test_plus_addressing_and_case(daemon):
    send(daemon, ["Alice+News@Example.TEST"], subject="plus")
    [msg] = daemon.messages("alice")
    assert msg["Subject"] == "plus"
    assert msg["Delivered-To"] == "alice@example.test"
    assert "for <Alice+News@Example.TEST>" in msg["Received"]


def test_postmaster_always_accepted(raw, daemon):
    session = raw()
    session.command("EHLO client.test")
    session.command("MAIL FROM:<>")
    assert session.command("RCPT TO:<Postmaster>").startswith("250 2.1.5")
    assert session.command("RCPT TO:<postmaster@other.test>").startswith("250 2.1.5")


def test_unknown_user_refused_at_rcpt(daemon):
    with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
        send(daemon, ["nobody@example.test"])
    code, text = caught.value.recipients["nobody@example.test"]
    assert (code, text[:5]) == (550, b"5.1.1")
    assert daemon.messages("alice") == []


def test_relay_refused_and_literal_never_local(raw, daemon):
    session = raw(source="127.0.0.2")  # not in relay.networks
    session.command("EHLO client.test")
    session.command("MAIL FROM:<s@client.test>")
    for rcpt in ("bob@remote.test", "alice@[127.0.0.1]", "u%remote.test@[127.0.0.1]"):
        assert session.command(f"RCPT TO:<{rcpt}>").startswith("554 5.7.1"), rcpt
    # A source route is stripped: only the final mailbox counts.
    assert session.command("RCPT TO:<@relay.test:alice@example.test>").startswith("250 2.1.5")
    assert "Relay access denied" in daemon.log()


def test_alias_with_remote_member_delivers_local_part_and_queues_the_rest(raw, daemon):
    session = raw(source="127.0.0.2")  # an anonymous client: the forward is the operator's, not a relay
    session.command("EHLO client.test")
    session.command("MAIL FROM:<s@client.test>")
    assert session.command("RCPT TO:<offsite@example.test>").startswith("250 2.1.5")
    assert session.command("DATA").startswith("354")
    session.send(b"Subject: forwarded\r\n\r\nx\r\n.\r\n")
    assert session.reply().startswith("250 2.0.0")
    assert [m["Subject"] for m in daemon.messages("alice")] == ["forwarded"]
    # The remote member went to the queue (and from there out; remote.test does not resolve here).
    assert "to=<offsite@example.test> size=" in daemon.log() and "local=1 queued=1" in daemon.log()


def test_size_declared_too_big_refused_at_mail(raw, make_daemon):
    daemon = make_daemon(limits="message_size = 10000")
    session = RawSession(daemon.port)
    assert "SIZE 10000" in session.command("EHLO client.test")
    assert session.command("MAIL FROM:<s@client.test> SIZE=10001").startswith("552 5.3.4")
    assert session.command("MAIL FROM:<s@client.test> SIZE=9000").startswith("250")
    session.close()


def test_size_body_over_limit_read_to_end_then_refused(make_daemon):
    daemon = make_daemon(limits="message_size = 10000")
    session = RawSession(daemon.port)
    session.command("EHLO client.test")
    session.command("MAIL FROM:<s@client.test>")
    session.command("RCPT TO:<alice@example.test>")
    assert session.command("DATA").startswith("354")
    session.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" + (b"y" * 70 + b"\r\n") * 400 + b".\r\n")
    assert session.reply().startswith("552 5.3.4")
    # The session goes on: a small message is accepted.
    session.command("MAIL FROM:<s@client.test>")
    session.command("RCPT TO:<alice@example.test>")
    session.command("DATA")
    session.send(b"Subject: small\r\n\r\nok\r\n.\r\n")
    assert session.reply().startswith("250 2.0.0")
    assert [m["Subject"] for m in daemon.messages("alice")] == ["small"]
    session.close()


def test_starttls_discards_pipelined_plaintext_and_forgets_state(raw, daemon):
    session = raw()
    session.command("EHLO client.test")
    assert session.command("MAIL FROM:<s@client.test>").startswith("250")
    # An attacker's injection: RSET (and a RCPT) ride in the same packet as STARTTLS.
    session.send(b"STARTTLS\r\nRSET\r\nRCPT TO:<alice@example.test>\r\n")
    assert session.reply().startswith("220 2.0.0")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls = context.wrap_socket(session.sock, server_hostname="mail.example.test")
    tls.settimeout(5)
    # After the handshake the session starts over: MAIL before EHLO is out of order,
    # and nothing answers the RSET or RCPT that were sent in plaintext.
    tls.sendall(b"MAIL FROM:<s@client.test>\r\n")
    first = tls.recv(4096).decode()
    assert first.startswith("503 5.5.1"), first
    tls.sendall(b"EHLO client.test\r\n")
    ehlo = tls.recv(4096).decode()
    assert ehlo.startswith("250-") and "STARTTLS" not in ehlo
    tls.close()


def test_smtplib_starttls_delivery(daemon):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.starttls(context=context)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.send_message(message("alice@example.test", "secure"), to_addrs=["alice@example.test"])
    [msg] = daemon.messages("alice")
    assert "with ESMTPS" in msg["Received"]


def test_tls_pair_generated_in_state_dir(daemon):
    assert (daemon.root / "state/tls/cert.pem").exists()
    key = daemon.root / "state/tls/key.pem"
    assert key.stat().st_mode & 0o077 == 0


def test_user_added_while_running_receives_mail(daemon):
    daemon.add_user("dave@example.test")
    send(daemon, ["dave@example.test"], subject="new user")
    assert [m["Subject"] for m in daemon.messages("dave")] == ["new user"]


def test_mail_survives_restart_and_daemon_accepts_again(daemon):
    send(daemon, ["alice@example.test"], subject="before restart")
    daemon.stop()
    daemon.start()
    send(daemon, ["alice@example.test"], subject="after restart")
    assert sorted(m["Subject"] for m in daemon.messages("alice")) == ["after restart", "before restart"]


def test_commands_noop_vrfy_help_rset(raw):
    session = raw()
    assert session.command("HELO client.test").startswith("250 ")
    assert session.command("NOOP").startswith("250 2.0.0")
    assert session.command("VRFY alice").startswith("252 2.5.0")
    assert session.command("HELP").startswith("214")
    assert session.command("RSET").startswith("250 2.0.0")
    assert session.command("QUIT").startswith("221 2.0.0")
    assert session.closed()


def test_ipv6_loopback_listener(make_daemon):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    daemon = make_daemon(start=False)
    text = daemon.config.read_text().replace(
        f'endpoint = "tcp:{daemon.port}:interface=127.0.0.1"',
        f'endpoint = "tcp:{daemon.port}:interface=127.0.0.1"\n\n[[listener]]\nrole = "mx"\nendpoint = "tcp6:{daemon.port}:interface=\\\\:\\\\:1"',
    )
    daemon.config.write_text(text)
    daemon.start()
    with smtplib.SMTP("::1", daemon.port, timeout=10) as client:
        client.send_message(message("alice@example.test", "v6"), to_addrs=["alice@example.test"])
    [msg] = daemon.messages("alice")
    assert "[IPv6:::1]" in msg["Received"]


def test_local_part_never_names_a_path_outside_the_maildir(raw, daemon):
    session = raw()
    session.command("EHLO client.test")
    session.command("MAIL FROM:<s@client.test>")
    # example.test has no catch-all: these are unknown users.
    for rcpt in ('"../../escape"@example.test', '"a/b"@example.test', "..@example.test"):
        assert session.command(f"RCPT TO:<{rcpt}>")[:9] in ("550 5.1.1", "501 5.1.3"), rcpt
    # other.test has a catch-all: the tricky names land in carol's Maildir, nowhere else.
    assert session.command('RCPT TO:<"../../escape"@other.test>').startswith("250")
    assert session.command("DATA").startswith("354")
    session.send(b"Subject: traversal\r\n\r\nx\r\n.\r\n")
    assert session.reply().startswith("250 2.0.0")
    assert [m["Subject"] for m in daemon.messages("carol", "other.test")] == ["traversal"]
    assert sorted(p.name for p in (daemon.root / "mail").iterdir()) == ["other.test"]
    assert sorted(p.name for p in (daemon.root / "mail/other.test").iterdir()) == ["carol"]
