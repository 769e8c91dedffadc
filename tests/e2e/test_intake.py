"""The one intake path, door by door: what mailhost does to a message is the same whether it
came by SMTP (relay network, submission, mx), `mailhost sendmail` or our own DSNs."""

from __future__ import annotations

import email
import email.policy
import json
import signal
import smtplib
import subprocess

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e.conftest import MAILHOST
from tests.e2e.test_deliverability import dns_zone, dnsfunc, inbound, relay_extra  # noqa: F401  (fixtures)
from tests.e2e.test_sending import ZONE, sinks, wait_for  # noqa: F401  (fixtures)

BARE = b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: no id, no date\r\n\r\nHello Bob.\r\n"


def with_key(daemon, dns_zone) -> None:
    """A DKIM key for example.test made by `mailhost dkim keygen`, published in the test zone."""
    keygen = daemon.cli("dkim", "keygen", "example.test", "--selector", "s1")
    record = "".join(keygen.stdout.splitlines()[-1].split('"')[1::2])
    dns_zone.update(ZONE + [("s1._domainkey.example.test", "TXT", record)])


def signed_fields(wire: bytes) -> list[str]:
    signature = email.message_from_bytes(wire, policy=email.policy.compat32)["DKIM-Signature"]
    tag = signature.split("h=", 1)[1].split(";", 1)[0]
    return [h.strip().lower() for h in tag.replace("\r\n", "").replace("\n", "").split(":")]


def sendmail(daemon, args: list[str], message: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([MAILHOST, "--config", str(daemon.config), "sendmail", *args], input=message,
                          capture_output=True, timeout=30)


def test_sendmail_mail_is_dkim_signed_and_verifies(make_daemon, dns_zone, sinks):
    mx1 = sinks("127.0.0.5")
    daemon = make_daemon(start=False, extra=relay_extra(dns_zone))
    with_key(daemon, dns_zone)
    daemon.start()
    result = sendmail(daemon, ["-f", "alice@example.test", "bob@remote.test"],
                      b"From: alice@example.test\nSubject: nightly report\n\nall good\n")
    assert result.returncode == 0, result.stderr
    [got] = wait_for(mx1.messages, what="delivery")
    wire = got["data"].encode("latin-1")
    assert dkim.verify(wire, dnsfunc=dnsfunc(dns_zone))
    fields = signed_fields(wire)
    assert "message-id" in fields and "date" in fields  # the intake's fix-ups came before the signature


def test_relay_network_mail_without_message_id_and_date_leaves_with_both_signed(make_daemon, dns_zone, sinks):
    mx1 = sinks("127.0.0.5")
    daemon = make_daemon(start=False, extra=relay_extra(dns_zone))
    with_key(daemon, dns_zone)
    daemon.start()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:  # 127.0.0.1 is in relay.networks
        client.sendmail("alice@example.test", ["bob@remote.test"], BARE)
    [got] = wait_for(mx1.messages, what="delivery")
    wire = got["data"].encode("latin-1")
    message = email.message_from_bytes(wire, policy=email.policy.compat32)
    assert message["Message-ID"].endswith("@mail.example.test>") and message["Date"]
    assert dkim.verify(wire, dnsfunc=dnsfunc(dns_zone))
    fields = signed_fields(wire)
    assert "message-id" in fields and "date" in fields


def test_mail_from_outside_gets_no_fix_ups_and_no_signature(make_daemon, dns_zone):
    daemon = make_daemon(start=False, extra=relay_extra(dns_zone))
    with_key(daemon, dns_zone)
    daemon.start()
    assert inbound(daemon, "alice@example.test", b"From: alice@example.test\nSubject: forged\n\nhi\n").startswith("250")
    [message] = daemon.messages("alice")
    assert message["Message-ID"] is None and message["Date"] is None and message["DKIM-Signature"] is None
    assert message["Authentication-Results"]


def test_sendmail_to_a_suppressed_address_exits_1_with_one_line(make_daemon, dns_zone, sinks):
    mx1 = sinks("127.0.0.5")
    daemon = make_daemon(extra=relay_extra(dns_zone))
    daemon.cli("suppress", "add", "gone@remote.test", "--reason", "left the company")
    result = sendmail(daemon, ["-f", "alice@example.test", "bob@remote.test", "gone@remote.test"],
                      b"Subject: hello\n\nhi\n")
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "gone@remote.test" in lines[0] and "suppressed" in lines[0], lines
    assert "nothing was sent" in lines[0]
    assert not list((daemon.root / "state" / "spool" / "pickup").glob("[!.]*"))
    assert mx1.messages() == []


def test_queued_mail_is_checked_against_the_suppression_list_again(make_daemon, dns_zone, sinks):
    """Suppressed after it was queued: the next attempt does not send to it, and the sender is told."""
    daemon = make_daemon(extra=relay_extra(dns_zone))  # no MX listening yet: the message waits in the queue
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.sendmail("alice@example.test", ["gone@remote.test"], BARE)
    wait_for(lambda: "gone@remote.test" in daemon.cli("queue", "list").stdout, what="queued")
    daemon.cli("suppress", "add", "gone@remote.test")
    mx1 = sinks("127.0.0.5")
    daemon.cli("queue", "flush")
    [bounce] = wait_for(lambda: daemon.messages("alice"), what="the bounce")
    assert bounce.get_content_type() == "multipart/report" and "suppressed" in bounce.as_string()
    assert mx1.messages() == []


def test_synchronous_550_5_1_1_suppresses_and_550_5_7_26_does_not(make_daemon, dns_zone, sinks):
    mx1 = sinks("127.0.0.5", script=[
        {"when": "RCPT", "match": "gone@", "reply": "550 5.1.1 The email account does not exist"},
        {"when": "RCPT", "match": "strict@", "reply": "550 5.7.26 Unauthenticated email is not accepted"},
    ])
    daemon = make_daemon(extra=relay_extra(dns_zone))
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.sendmail("alice@example.test", ["gone@remote.test", "strict@remote.test", "bob@remote.test"], BARE)
    wait_for(mx1.messages, what="delivery to bob")
    wait_for(lambda: daemon.messages("alice"), what="the bounce for gone and strict")

    def listed() -> list[str]:
        document = json.loads(daemon.cli("suppress", "list", "--json").stdout)
        return [entry["address"] for entry in document["suppressed"]]

    assert wait_for(lambda: "gone@remote.test" in listed(), what="gone suppressed")
    assert "strict@remote.test" not in listed() and "bob@remote.test" not in listed()
    # The next message to that address is refused at RCPT, with the reason the tool records.
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.ehlo()
        client.mail("alice@example.test")
        code, text = client.rcpt("gone@remote.test")
        assert code == 550 and text.startswith(b"5.1.1") and b"suppressed" in text
        assert client.rcpt("strict@remote.test")[0] == 250


def test_sighup_applies_dmarc_reject(make_daemon, dns_zone):
    dns_zone.update(ZONE + [("sender.test", "TXT", "v=spf1 -all"), ("_dmarc.sender.test", "TXT", "v=DMARC1; p=reject")])
    daemon = make_daemon(extra=relay_extra(dns_zone, dmarc_reject=False))
    forged = b"From: ceo@sender.test\nSubject: wire money\n\nnow\n"
    assert inbound(daemon, "ceo@sender.test", forged).startswith("250")
    daemon.config.write_text(daemon.config.read_text().replace("dmarc_reject = false", "dmarc_reject = true"))
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "changed inbound" in daemon.log(), what="the reload")
    reply = inbound(daemon, "ceo@sender.test", forged)
    assert reply.startswith("550 5.7.1") and "DMARC" in reply
    assert len(daemon.messages("alice")) == 1


def ec_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_an_unusable_dkim_key_gets_451_and_check_config_refuses_it(make_daemon, dns_zone):
    daemon = make_daemon(extra=relay_extra(dns_zone))
    # A key dropped into the keys folder while running (as keygen would place one): an EC key.
    folder = daemon.root / "state" / "dkim" / "example.test"
    folder.mkdir(parents=True)
    (folder / "ec1.key").write_bytes(ec_key_pem())
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.ehlo()
        client.mail("alice@example.test")
        assert client.rcpt("bob@example.test")[0] == 250

        def refused() -> tuple[int, bytes]:
            code, text = client.data(BARE)
            if code == 250:
                client.mail("alice@example.test")
                client.rcpt("bob@example.test")
            return (code, text) if code != 250 else None

        code, text = wait_for(refused, what="the key to be noticed")  # within a second of appearing
    assert code == 451 and text.startswith(b"4.3.0")
    log = daemon.log()
    assert "answered 451 4.3.0" in log and "ec1.key" in log and "DkimKeyError" in log
    # The same key named in [[dkim]]: check-config says which file and why, exit 1.
    (daemon.root / "ec.pem").write_bytes(ec_key_pem())
    daemon.config.write_text(daemon.config.read_text() + '\n[[dkim]]\ndomain = "example.test"\nselector = "s9"\n'
                             'key_file = "ec.pem"\n')
    result = daemon.cli("check-config", check=False)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "ec.pem" in line and "RSA" in line and "Traceback" not in result.stderr
