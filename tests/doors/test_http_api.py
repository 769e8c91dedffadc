"""The HTTP API's parts without the daemon: key storage, JSON -> message building, the rate
limit on task.Clock, and the routes answered over raw HTTP/1.1 (a real Intake, spool and
suppression list in a temporary folder; the e2e test adds TLS, curl and delivery)."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mailhost.authn.dkim import Signer
from mailhost.config import load
from mailhost.doors.http.api.compose import compose, raw_message
from mailhost.doors.http.api.errors import ApiError
from mailhost.doors.http.api.keys import ApiKeyError, ApiKeys, parse_scopes, parse_sender
from mailhost.doors.http.api.openapi import openapi_document
from mailhost.doors.http.api.ratelimit import TokenBuckets
from mailhost.doors.http.api.resource import ROUTES, ApiContext, ApiResource
from mailhost.doors.http.site import BODY_LIMIT, make_site
from mailhost.feedback.events import EventLog
from mailhost.feedback.suppression import SuppressionList
from mailhost.intake.cleanup import Intake
from mailhost.local.mailbox import LocalDomains
from mailhost.multiproc.shard import EVERYTHING
from mailhost.queue.spool import Spool

# --- keys ------------------------------------------------------------------------------------


def test_keys_are_stored_hashed_and_found(tmp_path: Path) -> None:
    keys = ApiKeys(tmp_path)
    key = keys.add("crm", ("send",), ("news@example.test", "@shop.example"), rate=5)
    assert key.startswith("mh_") and len(key) == 46
    text = (tmp_path / "apikeys.json").read_text()
    assert key not in text and key[3:20] not in text
    assert stat.S_IMODE(os.stat(tmp_path / "apikeys.json").st_mode) == 0o600
    found = ApiKeys(tmp_path).find(key)  # another process reads the file
    assert found is not None and (found.name, found.senders, found.rate, found.burst) == (
        "crm", ("news@example.test", "@shop.example"), 5.0, 25.0)
    assert keys.find(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert keys.find("") is None and keys.find("Bearer") is None and keys.find(key + "x") is None


def test_a_deleted_key_stops_working_for_a_reader_that_loaded_it(tmp_path: Path) -> None:
    reader = ApiKeys(tmp_path)
    key = ApiKeys(tmp_path).add("crm", ("send",), ())
    assert reader.find(key) is not None
    ApiKeys(tmp_path).delete("crm")
    assert reader.find(key) is None
    with pytest.raises(ApiKeyError, match="no key called 'crm'"):
        reader.delete("crm")


def test_names_scopes_senders_and_duplicates(tmp_path: Path) -> None:
    keys = ApiKeys(tmp_path)
    keys.add("crm", ("send",), ())
    with pytest.raises(ApiKeyError, match="exists"):
        keys.add("crm", ("read",), ())
    for bad in ("../x", "", "a b", "x" * 65, "-x"):
        with pytest.raises(ApiKeyError, match="key name"):
            keys.add(bad, ("send",), ())
    assert parse_scopes(None) == ("send",) and parse_scopes(["read", "send", "read"]) == ("read", "send")
    with pytest.raises(ApiKeyError, match="--scope 'root'"):
        parse_scopes(["root"])
    assert parse_sender("News@Example.TEST.") == "news@example.test" and parse_sender("@Shop.example") == "@shop.example"
    for bad in ("news", "a@b", "a@@b.test", "<a@b.test>", "a,b@c.test"):
        with pytest.raises(ApiKeyError, match="--sender"):
            parse_sender(bad)
    assert [k.name for k in keys.keys()] == ["crm"]


def test_scopes_admin_holds_both_send_and_read_are_separate(tmp_path: Path) -> None:
    keys = ApiKeys(tmp_path)
    admin = keys.find(keys.add("a", ("admin",), ()))
    send = keys.find(keys.add("s", ("send",), ()))
    both = keys.find(keys.add("b", ("send", "read"), ()))
    assert all(admin.allows(s) for s in ("send", "read", "admin"))
    assert send.allows("send") and not send.allows("read") and not send.allows("admin")
    assert both.allows("read") and both.allows("send") and not both.allows("admin")


def test_a_damaged_key_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "apikeys.json").write_text('{"version": 1, "keys": {"x": {"hash": "zz", "scopes": ["send"]}}}')
    with pytest.raises(ApiKeyError, match="entry of key 'x' is not one mailhost wrote"):
        ApiKeys(tmp_path).keys()
    (tmp_path / "apikeys.json").write_text("{")
    with pytest.raises(ApiKeyError, match="not valid JSON"):
        ApiKeys(tmp_path).find("mh_" + "a" * 43)


# --- JSON -> message ------------------------------------------------------------------------------

FULL = {"from": "Shop Ü <news@example.test>", "to": ["Bob <bob@remote.test>", "carol@remote.test"],
        "cc": "dave@remote.test", "bcc": ["audit@remote.test"], "subject": "Grüße", "text": "Hello\nthere",
        "html": "<p>Hello</p>", "headers": {"X-Campaign": "7", "List-Id": "<news.example.test>"},
        "attachments": [{"filename": "a.pdf", "content_type": "application/pdf",
                         "content": base64.b64encode(b"%PDF-1.4\x00\xff").decode()}]}


def test_json_builds_a_mime_message_and_the_envelope() -> None:
    built = compose(FULL, 100)
    assert built.sender == "news@example.test"
    assert built.recipients == ["bob@remote.test", "carol@remote.test", "dave@remote.test", "audit@remote.test"]
    assert b"\r" not in built.message and built.message.isascii()
    parsed = email.message_from_bytes(built.message, policy=email.policy.default)
    assert parsed["From"].addresses[0].display_name == "Shop Ü" and parsed["Subject"] == "Grüße"
    assert parsed["Bcc"] is None and b"audit@" not in built.message
    assert parsed["X-Campaign"] == "7" and parsed.get_content_type() == "multipart/mixed"
    body = parsed.get_body(("plain",))
    assert body.get_content() == "Hello\nthere\n" and parsed.get_body(("html",)).get_content() == "<p>Hello</p>\n"
    [attachment] = parsed.iter_attachments()
    assert attachment.get_filename() == "a.pdf" and attachment.get_content() == b"%PDF-1.4\x00\xff"


def test_html_only_and_a_single_address() -> None:
    built = compose({"from": "news@example.test", "to": "bob@remote.test", "html": "<b>x</b>"}, 10)
    parsed = email.message_from_bytes(built.message, policy=email.policy.default)
    assert parsed.get_content_type() == "text/html" and built.recipients == ["bob@remote.test"]


@pytest.mark.parametrize("change, code, field", [
    ({"from": None}, "missing_field", "from"),
    ({"to": None}, "missing_field", "to"),
    ({"text": None, "html": None}, "missing_field", "text"),
    ({"from": 5}, "invalid_field", "from"),
    ({"from": "a@b.test, c@d.test"}, "invalid_field", "from"),
    ({"to": ["bob@remote.test", "not an address"]}, "invalid_field", "to[1]"),
    ({"to": "bob@remote.test\r\nBcc: x@y.test"}, "invalid_field", "to"),
    ({"subject": "a\nBcc: x@y.test"}, "invalid_field", "subject"),
    ({"headers": {"From": "x@y.test"}}, "invalid_field", "headers.From"),
    ({"headers": {"X-A": "1\r\nBcc: x@y.test"}}, "invalid_field", "headers.X-A"),
    ({"headers": {"Bad Name": "1"}}, "invalid_field", "headers.Bad Name"),
    ({"attachments": [{"content": "not base64!"}]}, "invalid_field", "attachments[0].content"),
    ({"attachments": [{"filename": "../../etc/x", "content": ""}]}, "invalid_field", "attachments[0].filename"),
    ({"attachments": [{"content_type": "text", "content": ""}]}, "invalid_field", "attachments[0].content_type"),
    ({"attachments": [{}]}, "missing_field", "attachments[0].content"),
    ({"reply_to": "x@y.test"}, "unknown_field", "reply_to"),
    ({"to": [f"r{i}@remote.test" for i in range(11)]}, "too_many_recipients", "to"),
])
def test_json_errors_name_the_field(change: dict[str, Any], code: str, field: str) -> None:
    data = {**FULL, **change}
    data = {k: v for k, v in data.items() if v is not None}
    data.pop("cc"), data.pop("bcc")
    with pytest.raises(ApiError) as refused:
        compose(data, 10)
    assert (refused.value.status, refused.value.code, refused.value.field) == (400, code, field)


def test_a_raw_message_takes_its_envelope_from_the_query_or_its_fields() -> None:
    raw = b"From: News <news@example.test>\r\nTo: bob@remote.test, Carol <carol@remote.test>\r\nBcc: x@remote.test\r\n" \
          b"Subject: s\r\n\r\nhi\r\n"
    built = raw_message(raw, None, [], 10)
    assert built.sender == "news@example.test"
    assert built.recipients == ["bob@remote.test", "carol@remote.test", "x@remote.test"]
    assert built.message == b"From: News <news@example.test>\nTo: bob@remote.test, Carol <carol@remote.test>\n" \
                            b"Subject: s\n\nhi\n"
    chosen = raw_message(raw, "bounce@example.test", ["only@remote.test"], 10)
    assert (chosen.sender, chosen.recipients) == ("bounce@example.test", ["only@remote.test"])
    for bad, code in ((b"From: a@example.test\r\nTo: b@remote.test\r\n\r\nbare\rcr\r\n", "bad_message"),
                      (b"To: b@remote.test\r\n\r\nno from\r\n", "missing_field"),
                      (b"From: a@example.test\r\n\r\nno recipient\r\n", "missing_field"),
                      (b" folded first\r\nFrom: a@example.test\r\nTo: b@remote.test\r\n\r\nx\r\n", "bad_message")):
        with pytest.raises(ApiError) as refused:
            raw_message(bad, None, [], 10)
        assert refused.value.code == code


# --- rate limits -------------------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = task.Clock()
    buckets = TokenBuckets(clock)
    assert [buckets.take("k", 2.0, 4.0) for _ in range(4)] == [0, 0, 0, 0]
    assert buckets.take("k", 2.0, 4.0) == 1  # Retry-After: a whole second
    assert buckets.take("other", 2.0, 4.0) == 0  # per key
    clock.advance(0.5)
    assert buckets.take("k", 2.0, 4.0) == 0 and buckets.take("k", 2.0, 4.0) == 1
    slow = TokenBuckets(clock)
    assert slow.take("s", 0.1, 1.0) == 0 and slow.take("s", 0.1, 1.0) == 10


# --- the routes over HTTP ------------------------------------------------------------------------------

CONFIG = """
[server]
hostname = "mail.example.test"
state_dir = "state"
[[listener]]
role = "mx"
endpoint = "tcp:2525:interface=127.0.0.1"
[limits]
message_size = 4096
[[domain]]
name = "example.test"
maildir = "mail/example.test"
users = "users"
[http]
endpoint = "tcp:8443:interface=127.0.0.1"
"""


class Disk:
    """The blocking calls run at once (what the daemon's disk threads do, without threads)."""

    def run(self, f: Any, *args: Any) -> defer.Deferred:
        return defer.maybeDeferred(f, *args)


class World:
    def __init__(self, root: Path) -> None:
        (root / "mailhost.toml").write_text(CONFIG)
        (root / "users").write_text("")
        config = load(root / "mailhost.toml")
        state = root / "state"
        state.mkdir()
        self.spool = Spool(state / "spool")
        self.events = EventLog(state / "events")
        self.suppression = SuppressionList(state / "suppression.json", events=self.events)
        disk = Disk()
        intake = Intake(config, disk, self.spool, LocalDomains(config), Signer(state), self.suppression, disk.run,
                        EVERYTHING)
        self.keys = ApiKeys(state)
        self.clock = task.Clock()
        self.site = make_site({b"api": ApiResource(ApiContext(lambda: config, self.keys, intake, self.spool,
                                                              self.suppression, self.events, disk.run, self.clock))})

    def request(self, method: str, path: str, key: str | None = None, body: bytes | None = None,
                content_type: str = "application/json", declared: int | None = None) -> tuple[int, dict, dict]:
        head = f"{method} {path} HTTP/1.1\r\nHost: mail.example.test\r\nConnection: close\r\n"
        if key is not None:
            head += f"Authorization: Bearer {key}\r\n"
        if body is not None:
            head += f"Content-Type: {content_type}\r\nContent-Length: {declared or len(body)}\r\n"
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol = self.site.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(head.encode() + b"\r\n" + (body or b""))
        answer, _, payload = transport.value().partition(b"\r\n\r\n")
        lines = answer.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        protocol.connectionLost(None)
        if headers.get("transfer-encoding") == "chunked":
            payload = _unchunk(payload)
        return int(lines[0].split()[1]), json.loads(payload) if payload else {}, headers


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, data = out + rest[:n], rest[n + 2:]
    return out


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


MESSAGE = {"from": "news@example.test", "to": "bob@remote.test", "subject": "s", "text": "hi"}


def test_post_queues_durably_and_get_reads_it_back(world: World) -> None:
    send = world.keys.add("crm", ("send",), ("@example.test",))
    read = world.keys.add("dash", ("read",), ())
    status, answer, headers = world.request("POST", "/api/v1/messages", send, json.dumps(MESSAGE).encode())
    assert status == 202 and headers["content-type"] == "application/json", answer
    assert headers["strict-transport-security"] == "max-age=31536000" and headers["cache-control"] == "no-store"
    queue_id = answer["id"]
    envelope, message = world.spool.load_with_message(queue_id)  # on disk before the 202
    assert envelope.sender == "news@example.test" and envelope.client == "api key crm"
    assert b"Message-ID: <" in message and b"Date: " in message and b"from api key crm" in message
    status, shown, _ = world.request("GET", f"/api/v1/messages/{queue_id.lower()}", read)
    assert status == 200 and shown["queued"] is True
    assert [(r["address"], r["state"], r["attempts"]) for r in shown["recipients"]] == [("bob@remote.test", "pending", 0)]
    status, listing, _ = world.request("GET", "/api/v1/queue?state=pending&domain=REMOTE.test", read)
    assert status == 200 and [m["id"] for m in listing["messages"]] == [queue_id] and listing["total"] == 1
    assert world.request("GET", "/api/v1/queue?state=deferred", read)[1]["total"] == 0


def test_a_message_that_left_the_queue_is_read_from_the_events(world: World) -> None:
    read = world.keys.add("dash", ("read",), ())
    queue_id = "ABCDEFGHIJKLMNOP"
    world.events.record("deferred", queue_id=queue_id, recipient="bob@remote.test", sender="news@example.test",
                        reply="451 4.7.1 later", status="4.7.1", attempts=1, **{"class": "rate_limit"})
    world.events.record("delivered", queue_id=queue_id, recipient="bob@remote.test", sender="news@example.test",
                        reply="250 2.0.0 ok", status="2.0.0", attempts=2, **{"class": ""})
    status, shown, _ = world.request("GET", f"/api/v1/messages/{queue_id}", read)
    assert status == 200 and shown["queued"] is False and shown["sender"] == "news@example.test"
    assert shown["recipients"] == [{"address": "bob@remote.test", "state": "delivered", "attempts": 2,
                                    "last_reply": "250 2.0.0 ok", "status": "2.0.0", "class": "", "remote_mta": ""}]
    assert [e["event"] for e in shown["events"]] == ["deferred", "delivered"]
    status, events, _ = world.request("GET", "/api/v1/events?limit=1", read)
    assert [e["event"] for e in events["events"]] == ["deferred"]
    status, events, _ = world.request("GET", f"/api/v1/events?since={events['next']}", read)
    assert [e["event"] for e in events["events"]] == ["delivered"]
    assert world.request("GET", "/api/v1/events?since=../x", read)[1]["error"]["field"] == "since"
    assert world.request("GET", "/api/v1/events?limit=0", read)[1]["error"]["field"] == "limit"


def test_errors_are_json_with_stable_codes(world: World) -> None:
    send = world.keys.add("crm", ("send",), ("@example.test",))
    nobody = world.keys.add("nobody", ("send",), ())
    read = world.keys.add("dash", ("read",), ())
    body = json.dumps(MESSAGE).encode()
    cases = [
        (("POST", "/api/v1/messages", None, body), 401, "unauthorized"),
        (("POST", "/api/v1/messages", "mh_" + "A" * 43, body), 401, "invalid_key"),
        (("POST", "/api/v1/messages", read, body), 403, "insufficient_scope"),
        (("POST", "/api/v1/messages", nobody, body), 403, "sender_not_allowed"),
        (("POST", "/api/v1/messages", send, json.dumps({**MESSAGE, "from": "x@bank.test"}).encode()), 403,
         "sender_not_allowed"),
        (("POST", "/api/v1/messages", send, json.dumps({**MESSAGE, "headers": {"Sender": "x@bank.test"}}).encode()),
         403, "sender_not_allowed"),
        (("POST", "/api/v1/messages", send, b"{"), 400, "bad_json"),
        (("POST", "/api/v1/messages", send, b"\xff\xfe"), 400, "bad_json"),
        (("POST", "/api/v1/messages", send, json.dumps({**MESSAGE, "text": "x" * 5000}).encode()), 413, "too_large"),
        (("GET", "/api/v1/messages", send), 405, "method_not_allowed"),
        (("GET", "/api/v1/nothing", send), 404, "not_found"),
        (("GET", "/api/v2/queue", send), 404, "not_found"),
        (("GET", "/api/v1/messages/..%2F..%2Fetc", read), 404, "not_found"),
        (("POST", "/api/v1/suppressions", read, b"{}"), 403, "insufficient_scope"),
    ]
    for args, status, code in cases:
        got, answer, headers = world.request(*args)
        assert (got, answer["error"]["code"]) == (status, code), args
        if status == 401:
            assert headers["www-authenticate"].startswith('Bearer realm="mailhost"')
        if status == 405:
            assert headers["allow"] == "POST"
    got, answer, _ = world.request("POST", "/api/v1/messages", send, b"x", content_type="text/plain")
    assert (got, answer["error"]["code"]) == (415, "unsupported_media_type")
    assert list(world.spool.ids()) == []


def test_rate_limit_answers_429_with_retry_after(world: World) -> None:
    read = world.keys.add("dash", ("read",), (), rate=1)  # a burst of 5
    assert [world.request("GET", "/api/v1/queue", read)[0] for _ in range(6)] == [200] * 5 + [429]
    status, answer, headers = world.request("GET", "/api/v1/queue", read)
    assert status == 429 and answer["error"]["code"] == "rate_limited" and headers["retry-after"] == "1"
    world.clock.advance(1)
    assert world.request("GET", "/api/v1/queue", read)[0] == 200


def test_body_limits_per_resource(world: World) -> None:
    send = world.keys.add("crm", ("send",), ("@example.test",))
    # The messages resource takes more than the site's 64 KiB ... up to its own limit, refused unread past it.
    status, answer, headers = world.request("POST", "/api/v1/messages", send, b"{}", declared=10_000_000)
    assert status == 413 and answer["error"]["code"] == "too_large" and headers["connection"] == "close"
    # ... while every other API path keeps the small limit.
    status, answer, _ = world.request("POST", "/api/v1/suppressions", send, b"{}", declared=BODY_LIMIT + 1)
    assert status == 413 and answer["error"]["code"] == "too_large"
    assert world.request("POST", "/api/v1/suppressions", send, b"{}")[0] == 403  # under it: on to the key check


def test_suppressions_routes(world: World) -> None:
    admin = world.keys.add("ops", ("admin",), ())
    status, answer, _ = world.request("POST", "/api/v1/suppressions", admin, json.dumps(
        {"address": "Eve@Remote.test", "class": "complaint", "scope": "example.test"}).encode())
    assert status == 201 and answer["suppression"]["address"] == "eve@remote.test"
    assert answer["suppression"]["reason"] == "added with API key ops" and answer["suppression"]["scope"] == "example.test"
    status, answer, _ = world.request("POST", "/api/v1/suppressions", admin, b'{"address": "nope"}')
    assert (status, answer["error"]["field"]) == (400, "address")
    status, answer, _ = world.request("POST", "/api/v1/suppressions", admin, b'{"reason": "x"}')
    assert (status, answer["error"]["code"], answer["error"]["field"]) == (400, "missing_field", "address")
    status, listing, _ = world.request("GET", "/api/v1/suppressions?class=complaint", admin)
    assert status == 200 and listing["total"] == 1
    assert world.request("DELETE", "/api/v1/suppressions/eve%40remote.test?scope=other.test", admin)[0] == 404
    assert world.request("DELETE", "/api/v1/suppressions/eve%40remote.test", admin)[0] == 200
    assert world.suppression.entries() == []


def test_openapi_describes_exactly_the_routes(world: World) -> None:
    status, document, _ = world.request("GET", "/api/v1/openapi.json")
    assert status == 200 and document == json.loads(json.dumps(openapi_document(4096)))
    described = {(path, method.upper()) for path, item in document["paths"].items() for method in item}
    served = {("/" + "/".join("{id}" if p == "{}" and pattern[0] == "messages" else
                              "{address}" if p == "{}" else p for p in pattern), method.decode())
              for pattern, methods in ROUTES.items() for method in methods}
    assert described == served
