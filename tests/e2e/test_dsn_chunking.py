"""DSN (RFC 3461) and CHUNKING (RFC 3030) with a real peer, a private Postfix, both ways.

Postfix (tests/support/postfix.py) listens on 127.0.0.10 as pfx.test's MX (the test DNS
zone says so) and sends everything else to mailhost (relayhost). So:

- mailhost relays to Postfix with BDAT (Postfix's smtpd offers CHUNKING) and passes
  NOTIFY/ORCPT/ENVID on (it offers DSN); Postfix delivers, and its own "delivered" report
  comes back to the sender's mailbox at mailhost, naming our ENVID and ORCPT;
- Postfix's `sendmail -N success,failure -V ID` reaches mailhost with those parameters, and
  mailhost's "delivered" report for its local delivery lands in Postfix's mailbox;
- with DSN hidden by Postfix (smtpd_discard_ehlo_keywords), mailhost reports "relayed".

Postfix's SMTP client (3.7) does not send BDAT at all (only its smtpd speaks CHUNKING), so
BDAT into mailhost is exercised with a raw client here, hostile ones included.
"""

from __future__ import annotations

import email
import email.policy
import json
import mailbox
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import RawSession, free_port
from tests.e2e.test_postfix_peer import MX_ADDRESS, RECIPIENT, _postfix_unavailable
from tests.support import postfix as pf
from tests.support.dns import DNSServer

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: <user@pfx.test>\r\nSubject: dsn test\r\n"
           b"Message-ID: <dsn-e2e@example.test>\r\n\r\n.a leading dot\r\nbody\r\n")


def wait_for(what: Callable[[], list], why: Callable[[], str], timeout: float = 20) -> list:
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, why()
        time.sleep(0.1)
    return found


def reports(messages: list[mailbox.MaildirMessage]) -> list[str]:
    """The message/delivery-status parts of the DSNs among `messages`, as text."""
    found = []
    for message in messages:
        parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.compat32)
        for part in parsed.walk():
            if part.get_content_type() == "message/delivery-status":
                found.append("\n".join(str(block) for block in part.get_payload()))
    return found


@pytest.fixture
def world(make_daemon, tmp_path: Path) -> Iterator[Callable[..., tuple]]:
    """A mailhost daemon and a Postfix that each send the other's mail to the other."""
    reason = _postfix_unavailable()
    if reason is not None:
        pytest.skip(reason)
    postfix_port = free_port(MX_ADDRESS)
    zone = [("pfx.test", "MX", "10 mx.pfx.test"), ("mx.pfx.test", "A", MX_ADDRESS)]
    started: list[pf.Postfix] = []
    with DNSServer(zone) as dns:
        def make(*postfix_settings: str) -> tuple:
            daemon = make_daemon(start=False, extra=f'nameservers = ["{dns.nameserver}"]\nmx_port = {postfix_port}\n'
                                                    f'[queue]\nretry = ["1s"]\n')
            instance = pf.Postfix(tmp_path / "postfix", listen=f"{MX_ADDRESS}:{postfix_port}", mailboxes=[RECIPIENT],
                                  hostname="mx.pfx.test",
                                  settings=[f"relayhost = [127.0.0.1]:{daemon.port}", *postfix_settings])
            instance.start()
            started.append(instance)
            daemon.start()
            return daemon, instance

        yield make
        for instance in started:
            instance.stop()


def postfix_messages(instance: pf.Postfix) -> list[mailbox.MaildirMessage]:
    return list(mailbox.Maildir(instance.maildir(RECIPIENT), create=False))


def test_mailhost_passes_dsn_on_to_postfix_over_bdat_and_gets_its_delivered_report(world) -> None:
    daemon, postfix = world()
    import smtplib

    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.ehlo("client.example.test")
        assert client.has_extn("dsn") and client.has_extn("chunking")
        client.mail("alice@example.test", ["RET=HDRS", "ENVID=mh+2Benv-1"])
        client.rcpt(RECIPIENT, ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;User@pfx.test"])
        assert client.data(MESSAGE)[0] == 250

    why = lambda: f"mailhost log:\n{daemon.log()}\nmaillog:\n{postfix.log()}"  # noqa: E731
    [delivered] = wait_for(lambda: postfix_messages(postfix), why)
    assert delivered.get_payload().startswith(".a leading dot\n")  # BDAT: no stuffing to undo, none left
    # Postfix's smtpd counted a BDAT (and no DATA) in mailhost's session.
    assert wait_for(lambda: [line for line in postfix.log().splitlines() if "bdat=1" in line and "data=" not in line],
                    why)
    # Postfix took NOTIFY=SUCCESS and reports its delivery back to the sender, at mailhost.
    [report] = wait_for(lambda: reports(daemon.messages("alice")), why)
    assert "Original-Envelope-Id: mh+env-1" in report
    assert "Original-Recipient: rfc822;User@pfx.test" in report
    assert "Action: delivered" in report
    assert "Reporting-MTA: dns; mx.pfx.test" in report
    assert "sender delivery notification" not in daemon.log()  # Postfix reported; mailhost did not


def test_postfix_sendmail_dsn_options_reach_mailhost_and_its_delivered_report_reaches_postfix(world) -> None:
    daemon, postfix = world()
    message = b"From: user@pfx.test\nTo: bob@example.test\nSubject: from Postfix\n\nhello bob\n"
    subprocess.run(["sendmail", "-C", str(postfix.etc), "-N", "success,failure", "-V", "pf-env-2",
                    "-f", RECIPIENT, "bob@example.test"], input=message, check=True, timeout=30)
    why = lambda: f"mailhost log:\n{daemon.log()}\nmaillog:\n{postfix.log()}"  # noqa: E731
    [got] = wait_for(lambda: daemon.messages("bob"), why)
    assert got["Subject"] == "from Postfix"
    [report] = wait_for(lambda: reports(postfix_messages(postfix)), why)
    assert "Original-Envelope-Id: pf-env-2" in report
    assert "Reporting-MTA: dns; mail.example.test" in report
    assert "Final-Recipient: rfc822; bob@example.test" in report
    assert "Action: delivered" in report and "Status: 2.0.0" in report


def test_a_next_hop_without_dsn_gets_data_and_the_sender_a_relayed_report(world) -> None:
    daemon, postfix = world("smtpd_discard_ehlo_keywords = dsn, chunking")
    import smtplib

    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.ehlo("client.example.test")
        client.mail("alice@example.test", ["ENVID=relay-3"])
        client.rcpt(RECIPIENT, ["NOTIFY=SUCCESS"])
        assert client.data(MESSAGE)[0] == 250
    why = lambda: f"mailhost log:\n{daemon.log()}\nmaillog:\n{postfix.log()}"  # noqa: E731
    wait_for(lambda: postfix_messages(postfix), why)
    [report] = wait_for(lambda: reports(daemon.messages("alice")), why)
    assert "Action: relayed" in report and "Original-Envelope-Id: relay-3" in report
    assert "Remote-MTA: dns; mx.pfx.test" in report
    assert wait_for(lambda: [line for line in postfix.log().splitlines() if "data=1" in line and "bdat" not in line],
                    why)


def test_notify_never_sends_no_bounce_and_ret_full_returns_the_message(world) -> None:
    """Postfix refuses unknown users (550 5.1.1): with NOTIFY=NEVER no report; without NOTIFY
    (and RET=FULL) a bounce with the whole message."""
    daemon, postfix = world()
    import smtplib

    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.ehlo("client.example.test")
        client.mail("alice@example.test")
        client.rcpt("nobody@pfx.test", ["NOTIFY=NEVER"])
        assert client.data(MESSAGE)[0] == 250
        client.mail("alice@example.test", ["RET=FULL"])
        client.rcpt("else@pfx.test")
        assert client.data(MESSAGE)[0] == 250
    why = lambda: f"mailhost log:\n{daemon.log()}\nmaillog:\n{postfix.log()}"  # noqa: E731
    [bounce] = wait_for(lambda: daemon.messages("alice"), why)
    assert "else@pfx.test" in bounce.as_string() and "nobody@" not in bounce.as_string()
    assert "message/rfc822" in [part.get_content_type() for part in bounce.walk()]  # RET=FULL
    assert ".a leading dot" in bounce.as_string()
    wait_for(lambda: [] if json.loads(daemon.cli("queue", "list", "--json").stdout)["messages"] else [True], why)
    assert len(daemon.messages("alice")) == 1
    assert "to=<nobody@pfx.test>" in daemon.log()  # tried, failed, and not reported


def test_mailhost_sendmail_n_success_gets_a_delivered_report(make_daemon) -> None:
    from tests.e2e.test_sendmail import sendmail

    daemon = make_daemon()
    sendmail(daemon, ["-N", "success", "-V", "job-17", "-f", "alice@example.test", "bob@example.test"],
             b"Subject: from cron\n\nhello\n")
    wait_for(lambda: daemon.messages("bob"), daemon.log)
    [report] = wait_for(lambda: reports(daemon.messages("alice")), daemon.log)
    assert "Original-Envelope-Id: job-17" in report and "Action: delivered" in report


# --- BDAT into mailhost --------------------------------------------------------------


def test_bdat_into_mailhost(make_daemon) -> None:
    daemon = make_daemon()
    session = RawSession(daemon.port)
    try:
        assert "CHUNKING" in session.command("EHLO client.example.test")
        first, last = b"Subject: chunked\r\n\r\n", b".one\r\n..two\r\n.\r\nQUIT\r\n"
        session.send(b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<bob@example.test>\r\n"
                     + b"BDAT %d\r\n" % len(first) + first + b"BDAT %d LAST\r\n" % len(last) + last)
        assert [session.reply()[:3] for _ in range(3)] == ["250", "250", "250"]
        assert session.reply().startswith("250 2.0.0 Ok: queued as")
        assert session.command("QUIT").startswith("221")
    finally:
        session.close()
    [got] = daemon.messages("bob")
    assert got.get_payload() == ".one\n..two\n.\nQUIT\n"
    assert "bdat_chunks=2" in daemon.log()


def test_hostile_bdat(make_daemon) -> None:
    daemon = make_daemon(limits='message_size = 100000\ndata_timeout = "2s"')
    # Beyond the size limit: 552, nothing queued or delivered, the session goes on.
    session = RawSession(daemon.port)
    try:
        assert "CHUNKING" in session.command("EHLO client.example.test")
        # The first 552 leaves the session usable (the next MAIL is taken); the second, for a
        # giant chunk announced, comes at once, without waiting for it, and closes.
        for chunk in (b"BDAT 150000 LAST\r\n" + b"x" * 150000, b"BDAT 999999999999 LAST\r\nshort"):
            assert session.command("MAIL FROM:<sender@remote.test>").startswith("250")
            assert session.command("RCPT TO:<bob@example.test>").startswith("250")
            session.send(chunk)
            assert session.reply().startswith("552 5.3.4")
        assert session.closed()
    finally:
        session.close()
    # A chunk announced, a short part of it sent, then silence: cut by data_timeout.
    session = RawSession(daemon.port)
    try:
        session.command("EHLO client.example.test")
        session.send(b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<bob@example.test>\r\n"
                     b"BDAT 50000 LAST\r\nSubject: short\r\n\r\n")
        assert [session.reply()[:3] for _ in range(2)] == ["250", "250"]
        assert session.reply().startswith("421 4.4.2")
        assert session.closed()
    finally:
        session.close()
    assert daemon.messages("bob") == []
    assert json.loads(daemon.cli("queue", "list", "--json").stdout)["messages"] == []
