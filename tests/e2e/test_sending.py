"""Sending: the real daemon relays through a test DNS zone to test MX and smart hosts on 127.0.0.x."""

from __future__ import annotations

import email
import email.policy
import json
import smtplib
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.e2e.conftest import free_port
from tests.support.dns import DNSServer
from tests.support.peers import Sink, make_ca_and_cert, make_self_signed

MX_PORT = free_port()

ZONE = [
    ("remote.test", "MX", "10 mx1.remote.test"),
    ("remote.test", "MX", "20 mx2.remote.test"),
    ("mx1.remote.test", "A", "127.0.0.5"),
    ("mx2.remote.test", "A", "127.0.0.6"),
    ("implicit.test", "A", "127.0.0.7"),
    ("nullmx.test", "MX", "0 ."),
    ("smtp1.provider.test", "A", "127.0.0.8"),
    ("smtp2.provider.test", "A", "127.0.0.9"),
]


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(ZONE, servfail=["broken.test"]) as server:
        yield server


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[Callable[..., Sink]]:
    started: list[Sink] = []

    def start(address: str, port: int = MX_PORT, **options) -> Sink:
        sink = Sink(tmp_path / f"sink-{address}-{len(started)}", address=address, port=port, **options)
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


def relay_config(dns: DNSServer, queue: str = 'retry = ["1s"]', smarthosts: str = "", tls: str = "opportunistic") -> str:
    return f"""nameservers = ["{dns.nameserver}"]
mx_port = {MX_PORT}
tls = "{tls}"
{smarthosts}
[queue]
{queue}
"""


def submit(daemon, rcpts: list[str], subject: str, body: str = "Hello.\n", sender: str = "alice@example.test") -> None:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(rcpts)
    msg["Subject"] = subject
    msg.set_content(body)
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        assert client.send_message(msg, from_addr=sender, to_addrs=rcpts) == {}


def wait_for(condition: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def queue(daemon) -> list[dict]:
    return json.loads(daemon.cli("queue", "list", "--json").stdout)["messages"]


def dsn_reports(daemon, user: str = "alice") -> list[email.message.EmailMessage]:
    found = []
    for message in daemon.messages(user):
        parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
        if parsed.get_content_type() == "multipart/report":
            found.append(parsed)
    return found


def recipient_fields(report: email.message.EmailMessage) -> list[email.message.Message]:
    status = report.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    return status.get_payload()[1:]


def test_delivery_by_mx_with_trace_and_empty_queue_after(make_daemon, dns, sinks):
    mx1 = sinks("127.0.0.5")
    daemon = make_daemon(extra=relay_config(dns))
    submit(daemon, ["bob@remote.test"], "by mx")
    [got] = wait_for(mx1.messages, what="delivery to mx1")
    assert got["rcpt_to"] == ["bob@remote.test"] and got["mail_from"] == "alice@example.test"
    assert "by mail.example.test (mailhost)" in got["data"] and "Subject: by mx" in got["data"]
    wait_for(lambda: queue(daemon) == [], what="empty queue")
    assert "to=<bob@remote.test> relay=mx1.remote.test[127.0.0.5]" in daemon.log()


def test_mixed_local_and_remote_recipients_one_transaction(make_daemon, dns, sinks):
    mx1 = sinks("127.0.0.5")
    daemon = make_daemon(extra=relay_config(dns))
    submit(daemon, ["bob@example.test", "carol@remote.test", "dave@remote.test"], "mixed")
    assert [m["Subject"] for m in daemon.messages("bob")] == ["mixed"]
    [got] = wait_for(mx1.messages, what="one copy for both remote recipients")
    assert sorted(got["rcpt_to"]) == ["carol@remote.test", "dave@remote.test"]


def test_second_mx_used_when_first_refuses_connections(make_daemon, dns, sinks):
    mx2 = sinks("127.0.0.6")  # nothing listens on mx1 (127.0.0.5)
    daemon = make_daemon(extra=relay_config(dns))
    submit(daemon, ["bob@remote.test"], "fallback")
    [got] = wait_for(mx2.messages, what="delivery to mx2")
    assert "Subject: fallback" in got["data"]


def test_implicit_mx(make_daemon, dns, sinks):
    host = sinks("127.0.0.7")
    daemon = make_daemon(extra=relay_config(dns))
    submit(daemon, ["x@implicit.test"], "implicit")
    wait_for(host.messages, what="delivery to the domain's own address")


@pytest.mark.parametrize("rcpt, status", [("x@nullmx.test", "5.1.10"), ("x@nosuchdomain.test", "5.1.2")])
def test_null_mx_and_nxdomain_bounce_at_once(make_daemon, dns, rcpt, status):
    daemon = make_daemon(extra=relay_config(dns))
    submit(daemon, [rcpt], "doomed")
    [report] = wait_for(lambda: dsn_reports(daemon), what="bounce in alice's Maildir")
    [fields] = recipient_fields(report)
    assert fields["Action"] == "failed" and fields["Status"] == status
    assert fields["Final-Recipient"] == f"rfc822; {rcpt}"
    assert report["From"].addresses[0].username == "MAILER-DAEMON"
    wait_for(lambda: queue(daemon) == [], what="bounced message leaves the queue")


def test_servfail_defers(make_daemon, dns):
    daemon = make_daemon(extra=relay_config(dns, queue='retry = ["1h"]'))
    submit(daemon, ["x@broken.test"], "later")
    [entry] = wait_for(lambda: [m for m in queue(daemon) if m["recipients"][0]["attempts"]], what="one attempt")
    assert entry["recipients"][0]["state"] == "deferred" and entry["recipients"][0]["status"] == "4.4.3"
    assert dsn_reports(daemon) == []


def test_starttls_to_mx_with_self_signed_certificate(make_daemon, dns, sinks, tmp_path):
    cert, key = make_self_signed(tmp_path, "mx1.remote.test")
    mx1 = sinks("127.0.0.5", tls_cert=cert, tls_key=key)
    daemon = make_daemon(extra=relay_config(dns))
    submit(daemon, ["bob@remote.test"], "encrypted")
    [got] = wait_for(mx1.messages, what="delivery over TLS")
    assert got["tls"] is True


def test_tls_required_refuses_plaintext_mx(make_daemon, dns, sinks):
    mx1 = sinks("127.0.0.5")  # no STARTTLS offered
    daemon = make_daemon(extra=relay_config(dns, queue='retry = ["1h"]', tls="required"))
    submit(daemon, ["bob@remote.test"], "must be encrypted")
    wait_for(lambda: [m for m in queue(daemon) if m["recipients"][0]["attempts"]], what="a deferred attempt")
    assert mx1.messages() == []


def test_4xx_then_success_on_retry(make_daemon, dns, sinks):
    mx1 = sinks("127.0.0.5", script=[{"when": "RCPT", "reply": "450 4.2.1 mailbox busy", "times": 1}])
    daemon = make_daemon(extra=relay_config(dns))
    submit(daemon, ["bob@remote.test"], "second time lucky")
    [got] = wait_for(mx1.messages, what="delivery on retry")
    assert "Subject: second time lucky" in got["data"]
    assert "status=deferred (450 4.2.1 mailbox busy)" in daemon.log()
    assert dsn_reports(daemon) == []


def test_5xx_bounce_content(make_daemon, dns, sinks):
    sinks("127.0.0.5", script=[{"when": "RCPT", "match": "nobody@", "reply": "550 5.1.1 no such user here"}])
    daemon = make_daemon(extra=relay_config(dns))
    submit(daemon, ["nobody@remote.test", "bob@remote.test"], "partly doomed")
    [report] = wait_for(lambda: dsn_reports(daemon), what="bounce")
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    human, status, original = report.get_payload()
    assert "nobody@remote.test" in human.get_content()
    [fields] = recipient_fields(report)  # one bounce, for the failed recipient only
    assert fields["Final-Recipient"] == "rfc822; nobody@remote.test"
    assert (fields["Action"], fields["Status"]) == ("failed", "5.1.1")
    assert fields["Remote-MTA"] == "dns; mx1.remote.test"
    assert fields["Diagnostic-Code"].startswith("smtp; 550 5.1.1 no such user here")
    assert original.get_content_type() == "text/rfc822-headers"
    assert "Subject: partly doomed" in original.get_content()
    assert report["To"].addresses[0].addr_spec == "alice@example.test"


def test_lifetime_expiry_bounce(make_daemon, dns, sinks):
    sinks("127.0.0.5", script=[{"when": "RCPT", "reply": "450 4.2.1 try later"}])
    sinks("127.0.0.6", script=[{"when": "RCPT", "reply": "450 4.2.1 try later"}])
    daemon = make_daemon(extra=relay_config(dns, queue='retry = ["1s"]\nlifetime = "3s"\ndelay_warning = "0"'))
    submit(daemon, ["bob@remote.test"], "never")
    [report] = wait_for(lambda: dsn_reports(daemon), timeout=30, what="expiry bounce")
    [fields] = recipient_fields(report)
    assert fields["Action"] == "failed" and fields["Status"].startswith("4.")
    assert "expired" in report.get_payload()[0].get_content()
    wait_for(lambda: queue(daemon) == [], what="expired message leaves the queue")


def test_delay_warning_once(make_daemon, dns, sinks):
    sinks("127.0.0.5", script=[{"when": "RCPT", "reply": "450 4.2.1 try later"}])
    daemon = make_daemon(extra=relay_config(dns, queue='retry = ["1s"]\ndelay_warning = "1s"'))
    submit(daemon, ["bob@remote.test"], "slow")
    [report] = wait_for(lambda: dsn_reports(daemon), what="delay warning")
    [fields] = recipient_fields(report)
    assert fields["Action"] == "delayed"
    time.sleep(3)  # more attempts happen; still one warning
    assert len(dsn_reports(daemon)) == 1
    assert queue(daemon)[0]["recipients"][0]["attempts"] >= 2


def test_null_sender_never_bounced(make_daemon, dns):
    daemon = make_daemon(extra=relay_config(dns))
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.sendmail("<>", ["x@nullmx.test"], b"Subject: bounce of a bounce\r\n\r\nx\r\n")
    wait_for(lambda: queue(daemon) == [], what="dropped after failing")
    assert "non-delivery notification" not in daemon.log()


def smarthost_config(dns: DNSServer, *hosts: str) -> str:
    return relay_config(dns, smarthosts="\n".join(f"[[relay.smarthost]]\n{h}" for h in hosts))


def test_smarthost_primary_down_backup_used(make_daemon, dns, sinks):
    backup = sinks("127.0.0.9", port=0)
    daemon = make_daemon(extra=smarthost_config(
        dns,
        f'host = "smtp1.provider.test"\nport = {free_port("127.0.0.8")}\ntls = "none"',
        f'host = "smtp2.provider.test"\nport = {backup.port}\ntls = "none"',
    ))
    submit(daemon, ["bob@remote.test", "x@implicit.test"], "via backup")
    messages = wait_for(lambda: backup.messages() if len(backup.messages()) == 2 else None, what="both via the backup")
    assert sorted(r for m in messages for r in m["rcpt_to"]) == ["bob@remote.test", "x@implicit.test"]


def test_smarthost_4xx_goes_to_backup(make_daemon, dns, sinks):
    primary = sinks("127.0.0.8", port=0, script=[{"when": "MAIL", "reply": "451 4.3.0 busy"}])
    backup = sinks("127.0.0.9", port=0)
    daemon = make_daemon(extra=smarthost_config(
        dns,
        f'host = "smtp1.provider.test"\nport = {primary.port}\ntls = "none"',
        f'host = "smtp2.provider.test"\nport = {backup.port}\ntls = "none"',
    ))
    submit(daemon, ["bob@remote.test"], "primary busy")
    wait_for(backup.messages, what="delivery via the backup")
    assert primary.messages() == []


def test_smarthost_auth_over_verified_tls(make_daemon, dns, sinks, tmp_path):
    ca, cert, key = make_ca_and_cert(tmp_path, "smtp1.provider.test")
    primary = sinks("127.0.0.8", port=0, tls_cert=cert, tls_key=key, auth="acct:smart-secret")
    (tmp_path / "smarthost.pw").write_text("smart-secret\n")
    daemon = make_daemon(extra=smarthost_config(
        dns,
        f'host = "smtp1.provider.test"\nport = {primary.port}\ntls = "starttls"\nusername = "acct"\n'
        f'password_file = "{tmp_path / "smarthost.pw"}"\nca_file = "{ca}"',
    ))
    submit(daemon, ["bob@remote.test"], "authenticated")
    [got] = wait_for(primary.messages, what="delivery with AUTH")
    assert got["auth"] == "acct" and got["tls"] is True
    assert "smart-secret" not in daemon.log()


def test_dot_stuffing_leading_dots_and_16k_boundary(make_daemon, dns, sinks):
    mx1 = sinks("127.0.0.5")
    daemon = make_daemon(extra=relay_config(dns))
    # Every line starts with a dot, so whatever the header length, a dot line
    # sits on every 16 KiB boundary of the outbound stream; plus the shapes
    # that would end DATA early if one dot escaped stuffing.
    sent_body = "".join(f".{i:05d}" + "x" * 60 + "\r\n" for i in range(700))
    sent_body += ".\r\n..two\r\n.\r\nMAIL FROM:<evil@x.test>\r\nend\r\n"
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.sendmail("alice@example.test", ["bob@remote.test"], ("Subject: dots\r\n\r\n" + sent_body).encode())
    [got] = wait_for(mx1.messages, what="delivery")
    assert got["data"].split("\r\n\r\n", 1)[1] == sent_body
    time.sleep(0.5)
    assert len(mx1.messages()) == 1  # nothing smuggled


def test_restart_with_non_empty_queue(make_daemon, dns, sinks):
    daemon = make_daemon(extra=relay_config(dns, queue='retry = ["1h"]'))
    submit(daemon, ["bob@remote.test"], "survives restart")  # no MX is listening: deferred
    wait_for(lambda: [m for m in queue(daemon) if m["recipients"][0]["attempts"]], what="a failed attempt")
    daemon.stop()
    assert len(queue(daemon)) == 1  # the queue is on disk, readable with the daemon stopped
    mx1 = sinks("127.0.0.5")
    daemon.cli("queue", "flush")  # no daemon: makes it due at start
    daemon.start()
    wait_for(mx1.messages, what="delivery after restart")
    wait_for(lambda: queue(daemon) == [], what="empty queue")


def test_a_malformed_or_orphaned_envelope_does_not_stop_the_queue(make_daemon, dns, sinks):
    daemon = make_daemon(extra=relay_config(dns, queue='retry = ["1h"]'))
    submit(daemon, ["bob@remote.test"], "queued beside a bad envelope")  # no MX is listening: deferred
    [entry] = wait_for(lambda: [m for m in queue(daemon) if m["recipients"][0]["attempts"]], what="a failed attempt")
    daemon.stop()
    spool = daemon.root / "state" / "spool"
    bad = spool / "env" / "AA" / "AAAAAAAAAAAAAAAA.json"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text('{"id": "AAAAAAAAAAAAAAAA", "sender": "x@y.test", "recipients": []}')  # no times
    # An envelope whose message file is gone: what a delivered message's removal, not yet
    # synced to disk, can leave after a crash. It is removed, and nothing is sent for it.
    orphan_id = "B" * 16
    orphan = spool / "env" / orphan_id[:2] / f"{orphan_id}.json"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    good = (spool / "env" / entry["id"][:2] / f"{entry['id']}.json").read_text()
    orphan.write_text(good.replace(entry["id"], orphan_id))
    mx1 = sinks("127.0.0.5")
    daemon.cli("queue", "flush")
    daemon.start()
    [got] = wait_for(mx1.messages, what="the good message delivered")
    assert "queued beside a bad envelope" in got["data"]
    assert "AAAAAAAAAAAAAAAA: corrupt envelope (not an envelope: no arrival): moved with its message to " \
        f"{spool / 'corrupt' / 'AAAAAAAAAAAAAAAA.json'}" in daemon.log()
    assert not bad.exists() and (spool / "corrupt" / "AAAAAAAAAAAAAAAA.json").exists()
    wait_for(lambda: f"{orphan_id}: removed (its message file was already gone" in daemon.log(), what="the orphan removed")
    assert not orphan.exists() and len(mx1.messages()) == 1


def test_queue_commands_reach_the_running_daemon(make_daemon, dns, sinks):
    daemon = make_daemon(extra=relay_config(dns, queue='retry = ["1h"]'))
    submit(daemon, ["bob@remote.test"], "steered")
    submit(daemon, ["carol@remote.test"], "deleted")

    def both_deferred() -> list[dict] | None:
        entries = queue(daemon)  # one `mailhost queue list` a poll: each is a process start
        return entries if len(entries) == 2 and all(m["recipients"][0]["attempts"] for m in entries) else None

    entries = wait_for(both_deferred, what="two deferred messages")
    by_rcpt = {m["recipients"][0]["address"]: m["id"] for m in entries}
    steered, deleted = by_rcpt["bob@remote.test"], by_rcpt["carol@remote.test"]
    shown = daemon.cli("queue", "show", steered).stdout
    assert "Subject: steered" in shown and "bob@remote.test" in shown
    assert "deleted by the running daemon" in daemon.cli("queue", "delete", deleted).stdout
    assert "held by the running daemon" in daemon.cli("queue", "hold", steered).stdout
    mx1 = sinks("127.0.0.5")
    daemon.cli("queue", "flush")
    time.sleep(1.5)
    assert mx1.messages() == []  # held: not tried
    daemon.cli("queue", "release", steered)
    daemon.cli("queue", "flush", steered)
    [got] = wait_for(mx1.messages, what="delivery after release and flush")
    assert "Subject: steered" in got["data"]
    missing = daemon.cli("queue", "delete", "NOSUCHIDNOSUCHID", check=False)
    assert missing.returncode == 1 and "no such message" in missing.stderr
    not_an_id = daemon.cli("queue", "delete", "NOSUCHID", check=False)
    assert not_an_id.returncode == 1 and "is not a queue id" in not_an_id.stderr


def test_kill_9_under_load_loses_no_acknowledged_message(make_daemon, dns, sinks):
    import signal
    import threading

    mx1 = sinks("127.0.0.5")
    daemon = make_daemon(extra=relay_config(dns, queue='retry = ["1s"]'))
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        n = 0
        while not stop.is_set():
            subject = f"load-{worker}-{n}"
            try:
                with smtplib.SMTP("127.0.0.1", daemon.port, timeout=5) as smtp:
                    smtp.sendmail("s@client.test", ["alice@example.test", "bob@remote.test"],
                                  f"Subject: {subject}\r\n\r\nbody\r\n".encode())
            except (OSError, smtplib.SMTPException):
                return  # the daemon is gone: whatever was not acknowledged may be lost
            with lock:
                acknowledged.append(subject)
            n += 1

    workers = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for worker in workers:
        worker.start()
    wait_for(lambda: len(acknowledged) >= 60, what="some acknowledged messages")
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait()
    stop.set()
    for worker in workers:
        worker.join()
    with lock:
        promised = set(acknowledged)
    daemon.start()

    def subjects_at_sink() -> set[str]:
        return {line.split(": ", 1)[1] for m in mx1.messages() for line in m["data"].split("\r\n") if line.startswith("Subject: ")}

    wait_for(lambda: promised <= subjects_at_sink(), timeout=60, what="every acknowledged message at the MX")
    local = {m["Subject"] for m in daemon.messages("alice")}
    assert promised <= local, sorted(promised - local)[:5]


def test_messages_to_one_destination_share_a_connection(make_daemon, dns, sinks):
    mx1 = sinks("127.0.0.5")
    daemon = make_daemon(extra=relay_config(dns))
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        for n in range(8):
            client.sendmail("alice@example.test", [f"user{n}@remote.test"], f"Subject: batch {n}\r\n\r\nx\r\n".encode())
    wait_for(lambda: len(mx1.messages()) == 8, what="eight deliveries")
    connections = {entry["conn"] for entry in mx1.commands()}
    assert len(connections) < 8, connections


def test_throttling_slows_on_421_and_the_queue_still_drains(make_daemon, dns, sinks):
    # Every 5th connection is refused with 421; every message closes its connection,
    # so each delivery is a new connection and the refusals keep coming.
    mx1 = sinks("127.0.0.5", script=[
        {"when": "CONNECT", "reply": "421 4.7.0 too fast, slow down", "every": 5},
        {"when": "DATA_END", "reply": "250 2.0.0 ok", "close": True},
    ])
    sinks("127.0.0.6", script=[{"when": "CONNECT", "reply": "421 4.7.0 too fast, slow down"}])
    daemon = make_daemon(extra=relay_config(dns) + '\n[[throttle]]\nname = "remote"\nmx = ["remote.test"]\n'
                                                  'connections = 2\nrate = 1200\nfloor = 300\n')
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        for n in range(20):
            client.sendmail("alice@example.test", [f"user{n}@remote.test"], f"Subject: campaign {n}\r\n\r\nx\r\n".encode())
    # (a scripted DATA reply is not recorded by the sink: count the daemon's delivery lines)
    wait_for(lambda: daemon.log().count("status=delivered (250 2.0.0 ok)") == 20, timeout=60, what="all twenty delivered")
    wait_for(lambda: queue(daemon) == [], what="empty queue")
    assert len({line["conn"] for line in mx1.commands()}) >= 20  # a connection per message, 421s included
    assert "pace for remote down to 600/min (421 4.7.0 too fast, slow down)" in daemon.log()
    assert dsn_reports(daemon) == []  # nothing failed


def test_queue_list_shows_the_pace_of_each_group(make_daemon, dns):
    daemon = make_daemon(extra=relay_config(dns, queue='retry = ["1h"]') + '\n[[throttle]]\nname = "remote"\n'
                                                                          'mx = ["remote.test"]\nrate = 120\n')
    submit(daemon, ["bob@remote.test"], "paced")
    wait_for(lambda: [m for m in queue(daemon) if m["recipients"][0]["attempts"]], what="an attempt")
    listing = json.loads(daemon.cli("queue", "list", "--json").stdout)
    assert listing["pace"]["remote"]["max_rate"] == 120
    assert "pace remote:" in daemon.cli("queue", "list").stdout


def test_messages_over_the_pace_wait_in_the_queue_without_an_attempt(make_daemon, dns, sinks):
    mx1 = sinks("127.0.0.5")
    daemon = make_daemon(extra=relay_config(dns) + '\n[[throttle]]\nname = "remote"\nmx = ["remote.test"]\nrate = 40\n')
    started = time.monotonic()  # before the first message: a slow submission must not hide the pace
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        for n in range(4):  # 40/min: one every 1.5 s
            client.sendmail("alice@example.test", [f"user{n}@remote.test"], f"Subject: paced {n}\r\n\r\nx\r\n".encode())
    waiting = wait_for(lambda: [m for m in queue(daemon) if m["recipients"][0]["state"] == "pending"], what="a message held back")
    assert waiting[0]["recipients"][0]["attempts"] == 0
    wait_for(lambda: len(mx1.messages()) == 4, timeout=30, what="all four, at the pace")
    assert time.monotonic() - started > 4.0  # three gaps of 1.5 s at the least: not all at once
    assert dsn_reports(daemon) == []
