"""One-click unsubscribe (RFC 8058) with the real daemon: headers added and DKIM-signed on the
way out, a real HTTPS POST to the link taken from the delivered message, the mailto form."""

from __future__ import annotations

import email
import email.policy
import http.client
import json
import re
import socket
import ssl
import urllib.error
import urllib.request

import dkim
import pytest

from mailhost.feedback.events import event_log
from tests.e2e.conftest import RawSession, free_port
from tests.e2e.test_deliverability import (ZONE, add_submission_listener, authenticated_send, dns_zone,  # noqa: F401
                                           dnsfunc, relay_extra)
from tests.e2e.test_sending import sinks, wait_for  # noqa: F401  (fixtures)
from tests.e2e.test_sendmail import sendmail

CAMPAIGN = b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: Spring offer\r\n\r\nHello Bob.\r\n"


def suppressed(daemon) -> list[dict]:
    return json.loads(daemon.cli("suppress", "list", "--json").stdout)["suppressed"]


def signed_fields(wire: bytes) -> list[str]:
    signature = email.message_from_bytes(wire, policy=email.policy.compat32)["DKIM-Signature"]
    return [h.strip().lower() for h in re.sub(r"\s", "", signature.split("h=", 1)[1].split(";", 1)[0]).split(":")]


def rcpt(daemon, sender: str, recipient: str, source: str = "127.0.0.1") -> str:
    session = RawSession(daemon.port, source=source)
    try:
        session.command("EHLO client.test")
        assert session.command(f"MAIL FROM:<{sender}>").startswith("250")
        return session.command(f"RCPT TO:<{recipient}>")
    finally:
        session.close()


@pytest.fixture
def resolve_daemon_host(monkeypatch):
    """mail.example.test (the daemon's hostname, in its links) is 127.0.0.1 for this test."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        return real("127.0.0.1" if host == "mail.example.test" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_one_click_unsubscribe_end_to_end(make_daemon, dns_zone, sinks, resolve_daemon_host):
    sink = sinks("127.0.0.5")
    http_port = free_port()
    extra = relay_extra(dns_zone) + (f'[http]\nendpoint = "tcp:{http_port}:interface=127.0.0.1"\n'
                                     '[unsubscribe]\nadd_headers = true\nsenders = ["alice@example.test"]\n')
    daemon = make_daemon(start=False, extra=extra)
    port = add_submission_listener(daemon)
    record_line = daemon.cli("dkim", "keygen", "example.test", "--selector", "s1").stdout.splitlines()[-1]
    dns_zone.update(ZONE + [("s1._domainkey.example.test", "TXT", "".join(record_line.split('"')[1::2]))])
    daemon.start()

    # A marketing message submitted on the submission port leaves with both headers, signed.
    authenticated_send(daemon, port, "alice@example.test", ["bob@remote.test"], CAMPAIGN)
    [got] = wait_for(sink.messages, what="delivery")
    wire = got["data"].encode("latin-1")
    message = email.message_from_bytes(wire, policy=email.policy.compat32)
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link, mailto = re.findall(r"<([^>]+)>", message["List-Unsubscribe"])
    assert link.startswith(f"https://mail.example.test:{http_port}/unsubscribe/1h")
    assert mailto.startswith("mailto:unsubscribe+1m") and mailto.endswith("@example.test")
    assert dkim.verify(wire, dnsfunc=dnsfunc(dns_zone))
    assert {"list-unsubscribe", "list-unsubscribe-post"} <= set(signed_fields(wire))

    # The daemon's self-signed certificate, from state_dir, is what we trust.
    context = ssl.create_default_context(cafile=str(daemon.root / "state" / "tls" / "cert.pem"))

    # GET (a link scanner, a preview) shows a button and changes nothing.
    with urllib.request.urlopen(link, context=context, timeout=10) as answer:
        page = answer.read().decode()
        assert answer.status == 200
        assert 'method="post"' in page and "bob@remote.test" in page
        assert "max-age=" in answer.headers["Strict-Transport-Security"]
        assert "default-src 'none'" in answer.headers["Content-Security-Policy"]
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Cache-Control"] == "no-store"
        assert answer.headers["Server"] == "mailhost"
    assert suppressed(daemon) == []

    # A forged token (another recipient, the same MAC) gets 400 and changes nothing.
    forged = link.replace("bob=remote.test", "eve=remote.test")
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(urllib.request.Request(forged, data=b"List-Unsubscribe=One-Click"), context=context,
                               timeout=10)
    assert bad.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"https://mail.example.test:{http_port}/nothing", context=context, timeout=10)
    assert missing.value.code == 404
    assert suppressed(daemon) == []

    # Plain HTTP to the port gets no page.
    plain = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    with pytest.raises((http.client.HTTPException, OSError)):
        plain.request("GET", "/unsubscribe/x")
        plain.getresponse()
    plain.close()

    # The one-click POST (RFC 8058 3.2) unsubscribes at once.
    post = urllib.request.Request(link, data=b"List-Unsubscribe=One-Click", method="POST",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(post, context=context, timeout=10) as answer:
        assert answer.status == 200
    [entry] = suppressed(daemon)
    assert (entry["address"], entry["source"], entry["scope"]) == ("bob@remote.test", "unsubscribe", "example.test")
    events = list(event_log(daemon.root / "state").read())
    assert [e["event"] for e in events if e["recipient"] == "bob@remote.test"] == ["delivered", "unsubscribed",
                                                                                  "suppressed"]

    # The next message from that sender domain is refused at RCPT and by sendmail ...
    assert rcpt(daemon, "alice@example.test", "bob@remote.test").startswith("550 5.1.1")
    refused = sendmail(daemon, ["-f", "alice@example.test", "bob@remote.test"], b"Subject: again\n\nhi\n", check=False)
    assert refused.returncode == 1 and b"suppressed" in refused.stderr
    # ... while another sender domain's mail to them still passes.
    assert rcpt(daemon, "carol@other.test", "bob@remote.test").startswith("250")


def test_mailto_unsubscribe_from_sendmail_mail(make_daemon, dns_zone, sinks):
    sink = sinks("127.0.0.5")
    extra = relay_extra(dns_zone) + '[unsubscribe]\nadd_headers = true\nsenders = ["@example.test"]\n'
    daemon = make_daemon(extra=extra)

    # Another door: `mailhost sendmail`. No [http] listener: the mailto form only, no one-click.
    sendmail(daemon, ["-f", "alice@example.test", "dave@remote.test"], b"From: alice@example.test\nSubject: news\n\nhi\n")
    [got] = wait_for(sink.messages, what="delivery")
    message = email.message_from_bytes(got["data"].encode("latin-1"), policy=email.policy.compat32)
    [mailto] = re.findall(r"<mailto:([^>]+)>", message["List-Unsubscribe"])
    assert message["List-Unsubscribe-Post"] is None

    # A bad token is refused at RCPT; the real one is taken from anyone (the provider sends it).
    local, domain = mailto.split("@")
    assert rcpt(daemon, "dave@remote.test", f"{local[:-1]}x@{domain}", source="127.0.0.2").startswith("550 5.1.1")
    session = RawSession(daemon.port, source="127.0.0.2")
    session.command("EHLO remote.test")
    assert session.command("MAIL FROM:<dave@remote.test>").startswith("250")
    assert session.command(f"RCPT TO:<{mailto.upper()}>").startswith("250")  # a relay may change the case
    assert session.command("DATA").startswith("354")
    session.send(b"From: dave@remote.test\r\nSubject: unsubscribe\r\n\r\n.\r\n")
    assert session.reply().startswith("250")
    session.close()
    [entry] = suppressed(daemon)
    assert (entry["address"], entry["source"], entry["scope"]) == ("dave@remote.test", "unsubscribe", "example.test")
    assert rcpt(daemon, "alice@example.test", "dave@remote.test").startswith("550 5.1.1")
    # Consumed: no mailbox got it, nothing was queued.
    assert daemon.messages("alice") == [] and daemon.messages("bob") == []
    assert json.loads(daemon.cli("queue", "list", "--json").stdout)["messages"] == []
