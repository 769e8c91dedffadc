"""The HTTP API (/api/v1) with the real daemon and a real HTTP client (curl over TLS): a message
POSTed with a key is delivered to a sink, DKIM-signed, and listed as delivered; each kind of
bad request gets its 4xx JSON error and queues nothing; the key never reaches the log."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import dkim
import pytest

from mailhost.doors.http.api.keys import ApiKeys
from tests.e2e.conftest import free_port, wait_for_port
from tests.e2e.test_deliverability import ZONE, dns_zone, dnsfunc, relay_extra  # noqa: F401  (fixtures)
from tests.e2e.test_sending import sinks, wait_for  # noqa: F401  (fixtures)

MESSAGE_SIZE = 20000  # limits.message_size: an oversize body is easy to make


class Api:
    """curl against the daemon's [http] listener, trusting its generated certificate."""

    def __init__(self, daemon, port: int) -> None:
        self.daemon = daemon
        self.port = port
        self.base = f"https://mail.example.test:{port}/api/v1"

    def call(self, method: str, path: str, key: str | None = None, body: bytes | None = None,
             content_type: str = "application/json") -> tuple[int, dict, str]:
        """(status, JSON body, response headers)."""
        command = ["curl", "-sS", "--max-time", "20", "-X", method, "--cacert",
                   str(self.daemon.root / "state" / "tls" / "cert.pem"),
                   "--resolve", f"mail.example.test:{self.port}:127.0.0.1", "-D", "-", "-o", "/dev/stderr",
                   "-w", "%{http_code}"]
        if key is not None:
            command += ["-H", f"Authorization: Bearer {key}"]
        if body is not None:
            command += ["-H", f"Content-Type: {content_type}", "--data-binary", "@-"]
        done = subprocess.run([*command, self.base + path], input=body, capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr
        out = done.stdout.decode()
        headers, status = out[:-3], int(out[-3:])
        return status, json.loads(done.stderr) if done.stderr else {}, headers


def queued(daemon) -> list[dict]:
    return json.loads(daemon.cli("queue", "list", "--json").stdout)["messages"]


@pytest.fixture
def start_api(make_daemon, dns_zone, sinks):
    """A daemon with [http], a sink MX for remote.test and two keys: "send" (crm, may send as
    @example.test) and "read" (dashboard). `signed`: with a DKIM key for example.test, and the
    keys made by the real command (the other tests make them in-process, to start faster)."""

    def start(signed: bool = False):
        sink = sinks("127.0.0.5")
        port = free_port()
        extra = relay_extra(dns_zone) + (f'[http]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n'
                                         '[unsubscribe]\nadd_headers = true\nsenders = ["@example.test"]\n')
        daemon = make_daemon(start=False, extra=extra, limits=f"message_size = {MESSAGE_SIZE}")
        if signed:
            record_line = daemon.cli("dkim", "keygen", "example.test", "--selector", "s1").stdout.splitlines()[-1]
            dns_zone.update(ZONE + [("s1._domainkey.example.test", "TXT", "".join(record_line.split('"')[1::2]))])
            keys = {"send": daemon.cli("apikey", "add", "crm", "--sender", "@example.test").stdout.strip(),
                    "read": daemon.cli("apikey", "add", "dashboard", "--scope", "read").stdout.strip()}
        else:
            stored = ApiKeys(daemon.root / "state")
            keys = {"send": stored.add("crm", ("send",), ("@example.test",)),
                    "read": stored.add("dashboard", ("read",), ())}
        daemon.start()
        wait_for_port(port, daemon.process)
        return daemon, Api(daemon, port), keys, sink

    return start


def test_a_posted_message_is_delivered_signed_and_listed(start_api, dns_zone):
    daemon, api, keys, sink = start_api(signed=True)
    body = json.dumps({"from": "Shop <news@example.test>", "to": ["Bob <bob@remote.test>"], "bcc": "audit@remote.test",
                       "subject": "Spring offer", "text": "Hello Bob.", "html": "<p>Hello Bob.</p>",
                       "headers": {"X-Campaign": "spring"},
                       "attachments": [{"filename": "offer.txt", "content_type": "text/plain",
                                        "content": "T2ZmZXIu"}]}).encode()
    status, answer, _ = api.call("POST", "/messages", keys["send"], body)
    assert status == 202, answer
    assert answer["queued"] == 2 and answer["refused"] == []
    queue_id = answer["id"]

    def both() -> list[dict] | None:
        got = sink.messages()
        return got if sorted(r for m in got for r in m["rcpt_to"]) == ["audit@remote.test", "bob@remote.test"] else None

    for got in wait_for(both, what="delivery"):  # one transaction or one per recipient: the MX's choice
        wire = got["data"].encode("latin-1")
        head = wire.split(b"\r\n\r\n")[0]
        assert b"DKIM-Signature:" in head and dkim.verify(wire, dnsfunc=dnsfunc(dns_zone))
        assert b"X-Campaign: spring" in head and b"Bcc" not in head and b"audit@" not in head
        assert b"Message-ID:" in head and b"Date:" in head  # the intake's fix-ups
        assert f"id {queue_id}".encode() in head and b"from api key crm" in head

    def delivered() -> dict | None:
        status, answer, _ = api.call("GET", f"/messages/{queue_id}", keys["read"])
        states = {r["address"]: r["state"] for r in answer.get("recipients", [])}
        return answer if status == 200 and set(states.values()) == {"delivered"} and len(states) == 2 else None

    answer = wait_for(delivered, what="GET /messages/{id} to say delivered")
    assert answer["sender"] == "news@example.test" and answer["queued"] is False
    assert all(r["attempts"] == 1 and r["last_reply"].startswith("250") for r in answer["recipients"])
    status, events, _ = api.call("GET", "/events?limit=10", keys["read"])
    assert status == 200 and {e["event"] for e in events["events"]} == {"delivered"}
    status, again, _ = api.call("GET", f"/events?since={events['next']}", keys["read"])
    assert status == 200 and again["events"] == [] and again["next"] == events["next"]
    # A raw message works the same way; the key is in no log line.
    raw = b"From: news@example.test\r\nTo: carol@remote.test\r\nSubject: raw\r\n\r\nHi.\r\n"
    status, answer, _ = api.call("POST", "/messages", keys["send"], raw, "message/rfc822")
    assert status == 202 and answer["queued"] == 1
    # To one recipient, from a marketing sender: the intake adds the RFC 8058 headers, and signs them.
    got = wait_for(lambda: [m for m in sink.messages() if m["rcpt_to"] == ["carol@remote.test"]], what="delivery")
    wire = got[0]["data"].encode("latin-1")
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in wire and dkim.verify(wire, dnsfunc=dnsfunc(dns_zone))
    assert keys["send"] not in daemon.log() and keys["read"] not in daemon.log()
    assert "via=api key=crm" in daemon.log()


BAD_REQUESTS = [  # (what is wrong, status, error code, field)
    ("bad json", 400, "bad_json", None),
    ("missing field", 400, "missing_field", "to"),
    ("wrong key", 401, "invalid_key", None),
    ("no key", 401, "unauthorized", None),
    ("read key", 403, "insufficient_scope", None),
    ("foreign sender", 403, "sender_not_allowed", "from"),
    ("oversize", 413, "too_large", None),
    ("wrong type", 415, "unsupported_media_type", None),
]


def test_bad_requests_get_json_errors_and_queue_nothing(start_api):
    daemon, api, keys, sink = start_api()
    good = {"from": "news@example.test", "to": "bob@remote.test", "subject": "s", "text": "hi"}
    for case, status, code, field in BAD_REQUESTS:
        key, body, content_type = keys["send"], json.dumps(good).encode(), "application/json"
        if case == "bad json":
            body = b'{"from": "news@example.test", "to": '
        elif case == "missing field":
            body = json.dumps({k: v for k, v in good.items() if k != "to"}).encode()
        elif case == "wrong key":
            key = "mh_" + "x" * 43
        elif case == "no key":
            key = None
        elif case == "read key":
            key = keys["read"]
        elif case == "foreign sender":
            body = json.dumps({**good, "from": "ceo@bank.test"}).encode()
        elif case == "oversize":  # over the body limit: refused before it is read
            body = json.dumps({**good, "text": "x" * (MESSAGE_SIZE * 2 + 70000)}).encode()
        elif case == "wrong type":
            content_type = "text/plain"
        got, answer, headers = api.call("POST", "/messages", key, body, content_type)
        assert got == status, (case, answer)
        assert answer["error"]["code"] == code and answer["error"]["message"], case
        assert answer["error"].get("field") == field, case
        assert "content-type: application/json" in headers.lower(), case
        if status == 401:
            assert "www-authenticate: bearer" in headers.lower()
    # A message over limits.message_size in a body under the limit: 413 from the message check.
    body = json.dumps({**good, "text": "y" * (MESSAGE_SIZE + 10)}).encode()
    got, answer, _ = api.call("POST", "/messages", keys["send"], body)
    assert (got, answer["error"]["code"], answer["error"]["field"]) == (413, "too_large", "message")
    assert queued(daemon) == [] and sink.messages() == []
    assert not list((daemon.root / "state" / "spool").rglob("*.json"))


def test_read_routes_and_suppressions(start_api):
    daemon, api, keys, sink = start_api()
    admin = daemon.cli("apikey", "add", "ops", "--scope", "admin").stdout.strip()  # counts without a restart
    status, answer, _ = api.call("POST", "/suppressions", admin, json.dumps({"address": "eve@remote.test",
                                                                            "reason": "asked"}).encode())
    assert status == 201 and answer["suppression"]["address"] == "eve@remote.test"
    assert api.call("POST", "/suppressions", keys["read"], b"{}")[0] == 403
    status, listing, _ = api.call("GET", "/suppressions?address=eve@remote.test", keys["read"])
    assert status == 200 and [e["reason"] for e in listing["suppressions"]] == ["asked"]
    # The suppression list applies to API mail: the only recipient is refused, nothing queued.
    body = json.dumps({"from": "news@example.test", "to": "eve@remote.test", "text": "hi"}).encode()
    status, answer, _ = api.call("POST", "/messages", keys["send"], body)
    assert status == 422 and answer["error"]["code"] == "recipients_refused" and "suppressed" in answer["error"]["message"]
    assert queued(daemon) == []
    assert api.call("DELETE", "/suppressions/eve%40remote.test", admin)[0] == 200
    assert api.call("DELETE", "/suppressions/eve%40remote.test", admin)[:2] == (404, {"error": {
        "code": "not_found", "message": "eve@remote.test is not suppressed"}})
    status, queue, _ = api.call("GET", "/queue?state=held", keys["read"])
    assert status == 200 and queue == {"messages": [], "total": 0, "truncated": False}
    assert api.call("GET", "/queue?state=lost", keys["read"])[1]["error"]["field"] == "state"
    assert api.call("GET", "/messages/AAAAAAAAAAAAAAAA", keys["read"])[0] == 404
    assert api.call("PUT", "/queue", keys["read"])[0] == 405
    assert api.call("GET", "/nothing", keys["read"])[0] == 404
    status, document, _ = api.call("GET", "/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.") and "/messages" in document["paths"]
