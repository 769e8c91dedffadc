"""Events for campaign tools, end to end: the real daemon, a recording sink, and an HTTPS webhook
receiver in this test that is down for a while, with a kill -9 of the daemon in between."""

from __future__ import annotations

import json
import signal
import smtplib
import ssl
import threading
import time
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mailhost.feedback.webhooks import verify
from tests.e2e.conftest import free_port
from tests.support.peers import Sink, make_ca_and_cert

SECRET = b"hook-secret-for-tests"


class Receiver:
    """An HTTPS server on loopback recording every POST: (headers, body)."""

    def __init__(self, port: int, cert, key) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(daemon, recipients: list[str], subject: str) -> None:
    msg = EmailMessage()
    msg["From"] = "alice@example.test"
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject}@example.test>"
    msg["X-Listmonk-Campaign"] = "9f86b50d-5711-41c8-ab03-bc91c43d711b"
    msg.set_content("Hello.\n")
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.send_message(msg, from_addr="alice@example.test", to_addrs=recipients)


def logged_events(daemon) -> list[dict]:
    folder = daemon.root / "state" / "events"
    lines = b"".join(p.read_bytes() for p in sorted(folder.glob("events*.jsonl"), key=lambda p: (p.name == "events.jsonl", p.name)))
    return [json.loads(line) for line in lines.splitlines() if line.strip()]


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_every_event_reaches_a_webhook_down_for_a_while_across_a_kill_9(make_daemon, tmp_path):
    ca, cert, key = make_ca_and_cert(tmp_path / "tls", "localhost")
    (tmp_path / "hook.secret").write_bytes(SECRET + b"\n")
    sink = Sink(tmp_path / "sink", script=[
        {"when": "RCPT", "match": "gone@", "reply": "550 5.1.1 no such user"},
        {"when": "RCPT", "match": "later@", "reply": "450 4.2.1 mailbox busy", "times": 1},
    ])
    hook_port = free_port()
    daemon = make_daemon(start=False, extra=f"""
[[relay.smarthost]]
host = "127.0.0.1"
port = {sink.port}
tls = "none"

[queue]
retry = ["1s"]

[[webhook]]
url = "https://localhost:{hook_port}/hooks/mail"
secret_file = "{tmp_path / 'hook.secret'}"
ca_file = "{ca}"
""")
    receiver = None
    try:
        daemon.start()
        send(daemon, ["ann@remote.test", "gone@remote.test", "later@remote.test"], "first")
        # delivered ann, bounced + suppressed gone, deferred then delivered later: all in the log
        wait_for(lambda: {(e["event"], e["recipient"]) for e in logged_events(daemon)} >= {
            ("delivered", "ann@remote.test"), ("bounced", "gone@remote.test"), ("suppressed", "gone@remote.test"),
            ("deferred", "later@remote.test"), ("delivered", "later@remote.test")})
        daemon.stop(signal.SIGKILL)  # the receiver has been down all along: nothing was taken yet

        daemon.start()
        send(daemon, ["bob@remote.test"], "second")
        wait_for(lambda: ("delivered", "bob@remote.test") in {(e["event"], e["recipient"]) for e in logged_events(daemon)})
        receiver = Receiver(hook_port, cert, key)  # up at last: the retries find it
        expected = {e["id"] for e in logged_events(daemon)}
        wait_for(lambda: expected <= {json.loads(body)["id"] for _, body in receiver.posts}, timeout=25)
    finally:
        daemon.stop()
        sink.stop()
        if receiver is not None:
            receiver.stop()

    events = logged_events(daemon)
    assert len({e["id"] for e in events}) == len(events)  # unique ids
    by_id = {}
    for headers, body in receiver.posts:
        event = json.loads(body)
        assert headers["X-Mailhost-Event-Id"] == event["id"]
        assert verify(SECRET, body, headers["X-Mailhost-Signature"], now=time.time())
        by_id[event["id"]] = event
    assert set(by_id) == {e["id"] for e in events}  # none lost, none made up
    # In log order (a receiver sees a recipient's deferral before its delivery).
    first_seen = list(dict.fromkeys(json.loads(body)["id"] for _, body in receiver.posts))
    assert first_seen == [e["id"] for e in events]
    bounced = next(e for e in by_id.values() if e["event"] == "bounced")
    assert (bounced["recipient"], bounced["status"], bounced["sender"]) == ("gone@remote.test", "5.1.1",
                                                                          "alice@example.test")
    assert "550" in bounced["reply"] and bounced["message_id"] == "<first@example.test>"
    assert bounced["campaign"] == "9f86b50d-5711-41c8-ab03-bc91c43d711b" and "class" in bounced
    deferred = next(e for e in by_id.values() if e["event"] == "deferred")
    assert deferred["recipient"] == "later@remote.test" and deferred["reply"].startswith("450")
    assert "not delivered" in daemon.log()  # the down receiver was retried, and said so
