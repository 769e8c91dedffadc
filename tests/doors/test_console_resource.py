"""The console resource's shared rules, without a browser: login required, the CSRF token
on every POST, the cookie's attributes, the CSP, escaping."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from mailhost.doors.http.console.context import ConsoleContext
from mailhost.doors.http.console.resource import ConsoleResource
from mailhost.doors.http.console.sessions import SessionStore
from mailhost.feedback.suppression import SuppressionList
from mailhost.feedback.traffic import Traffic


class Request(DummyRequest):
    def __init__(self, path: list[bytes], method: bytes = b"GET", args: dict[str, str] | None = None,
                 cookie: str | None = None) -> None:
        super().__init__(path)
        self.method = method
        self.args = {k.encode(): [v.encode()] for k, v in (args or {}).items()}
        self.cookie = cookie

    def getCookie(self, name: bytes) -> bytes | None:
        return self.cookie.encode() if self.cookie is not None and name == b"mailhost_console" else None

    def body(self) -> str:
        return b"".join(self.written).decode()


@pytest.fixture
def console(tmp_path: Path):
    sessions = SessionStore(Clock())
    suppression = SuppressionList(tmp_path / "suppression.json")
    context = ConsoleContext(None, None, None, None, None, None, suppression, None,  # type: ignore[arg-type]
                             Traffic(tmp_path / "traffic.json", lambda r, m: "x"), None,
                             lambda f, *a, **k: maybeDeferred(f, *a, **k), Clock(), sessions)
    return ConsoleResource(context), sessions, suppression


def render(resource: ConsoleResource, request: Request) -> Request:
    resource.render(request)
    assert request.finished
    return request


def test_pages_need_a_login(console):
    resource, _, _ = console
    request = render(resource, Request([b""]))
    assert request.responseCode == 303 and request.responseHeaders.getRawHeaders(b"Location") == [b"/console/login"]
    assert b"style-src 'self'" in request.responseHeaders.getRawHeaders(b"Content-Security-Policy")[0]


def test_login_form_sets_a_strict_cookie_and_carries_the_token(console):
    resource, sessions, _ = console
    request = render(resource, Request([b"login"]))
    [cookie] = request.responseHeaders.getRawHeaders(b"Set-Cookie")
    name_value, *attributes = cookie.decode().split("; ")
    assert attributes == ["Path=/console", "Secure", "HttpOnly", "SameSite=Strict"]
    session = sessions.get(name_value.split("=", 1)[1])
    assert session is not None and session.user == ""
    assert f'name="csrf" value="{session.csrf}"' in request.body()


@pytest.mark.parametrize("token", [None, "", "guess"])
def test_a_post_without_its_token_is_refused_and_changes_nothing(console, token):
    resource, sessions, suppression = console
    session = sessions.new("alice@example.test")
    args = {"action": "add", "address": "bob@remote.test"}
    if token is not None:
        args["csrf"] = token
    request = render(resource, Request([b"suppressions"], b"POST", args, cookie=session.id))
    assert request.responseCode == 403
    assert suppression.entries() == []
    # Another session's token does not do either.
    other = sessions.new("carol@example.test")
    request = render(resource, Request([b"suppressions"], b"POST", {**args, "csrf": other.csrf}, cookie=session.id))
    assert request.responseCode == 403 and suppression.entries() == []


def test_a_post_with_its_token_acts_and_pages_escape(console):
    resource, sessions, suppression = console
    session = sessions.new("alice@example.test")
    args = {"action": "add", "address": "bob@remote.test", "reason": "<script>alert(1)</script>", "csrf": session.csrf}
    request = render(resource, Request([b"suppressions"], b"POST", args, cookie=session.id))
    assert request.responseCode == 303
    assert [e.address for e in suppression.entries()] == ["bob@remote.test"]
    page = render(resource, Request([b"suppressions"], cookie=session.id)).body()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "bob@remote.test suppressed." in page  # the notice, shown once


def test_no_post_without_a_session_and_no_login_form_session_beyond_login(console):
    resource, sessions, _ = console
    assert render(resource, Request([b"suppressions"], b"POST", {"csrf": "x"})).responseCode == 403
    form = sessions.new()  # a login form's session holds a valid token but no user
    request = render(resource, Request([b"queue"], b"POST", {"action": "flush", "csrf": form.csrf}, cookie=form.id))
    assert request.responseCode == 403
