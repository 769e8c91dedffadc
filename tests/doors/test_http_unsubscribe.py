"""The HTTPS door's site and /unsubscribe/<token> (mailhost.doors.http), spoken to in raw HTTP/1.1
(the TLS layer around it is the e2e test's)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mailhost.doors.http.site import BODY_LIMIT, make_site
from mailhost.doors.http.unsubscribe import UnsubscribeResource
from mailhost.feedback.events import EventLog
from mailhost.feedback.suppression import SuppressionList
from mailhost.feedback.unsubscribe import KEY_BYTES, UnsubscribeTokens

TOKENS = UnsubscribeTokens(b"k" * KEY_BYTES)
TOKEN = TOKENS.link_token("Bob<b>@remote.test", "news@shop.example")


class World:
    def __init__(self, root: Path) -> None:
        self.events = EventLog(root / "events")
        self.suppression = SuppressionList(root / "suppression.json", events=self.events)
        resource = UnsubscribeResource(TOKENS, self.suppression, lambda f, *a: defer.maybeDeferred(f, *a))
        self.site = make_site({b"unsubscribe": resource})

    def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
        protocol = self.site.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(raw)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        protocol.connectionLost(None)
        return int(lines[0].split()[1]), headers, body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: mail.example.test\r\nConnection: close\r\n\r\n".encode()


def post(path: str, body: bytes = b"List-Unsubscribe=One-Click", content_type: str = "application/x-www-form-urlencoded"
         ) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: mail.example.test\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_get_shows_a_button_and_changes_nothing(world: World) -> None:
    code, headers, body = world.request(get(f"/unsubscribe/{TOKEN}"))
    assert code == 200 and b'<form method="post" action="">' in body
    assert b"bob&lt;b&gt;@remote.test" in body and b"<b>@" not in body  # escaped
    assert headers["content-security-policy"].startswith("default-src 'none'; style-src 'sha256-")
    assert headers["strict-transport-security"] == "max-age=31536000"
    assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-store"
    assert headers["server"] == "mailhost"
    assert world.suppression.entries() == []


@pytest.mark.parametrize("body, content_type", [
    (b"List-Unsubscribe=One-Click", "application/x-www-form-urlencoded"),
    (b'--b\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\nOne-Click\r\n--b--\r\n',
     "multipart/form-data; boundary=b"),
    (b"", "text/plain"),
])
def test_post_unsubscribes_whatever_the_body(world: World, body: bytes, content_type: str) -> None:
    code, headers, page = world.request(post(f"/unsubscribe/{TOKEN}", body, content_type))
    assert code == 200 and b"will get no more mail" in page
    [entry] = world.suppression.entries()
    assert (entry.address, entry.scope, entry.source, entry.category) == (
        "bob<b>@remote.test", "shop.example", "unsubscribe", "unsubscribe")
    assert [e["event"] for e in world.events.read()] == ["unsubscribed", "suppressed"]
    # A second POST (providers retry) answers the same and records nothing new.
    assert world.request(post(f"/unsubscribe/{TOKEN}"))[0] == 200
    assert len(list(world.events.read())) == 2


@pytest.mark.parametrize("request_bytes, expected", [
    (post("/unsubscribe/" + TOKEN.replace("bob", "eve")), 400),
    (post("/unsubscribe/1hxyz.bob=remote.test=shop.example"), 400),
    (get("/unsubscribe/%ff%fe"), 400),
    (get("/unsubscribe/" + TOKEN + "/more"), 404),
    (get("/unsubscribe/"), 404),
    (get("/unsubscribe"), 404),
    (get("/"), 404),
    (get("/admin"), 404),
])
def test_bad_tokens_and_other_paths(world: World, request_bytes: bytes, expected: int) -> None:
    code, headers, _ = world.request(request_bytes)
    assert code == expected
    assert headers["server"] == "mailhost" and headers["cache-control"] == "no-store"
    assert world.suppression.entries() == []


def test_a_body_over_the_limit_is_refused_unread(world: World) -> None:
    code, headers, _ = world.request(post(f"/unsubscribe/{TOKEN}", b"x" * (BODY_LIMIT + 1)))
    assert code == 413 and headers["connection"] == "close"
    assert world.suppression.entries() == []
