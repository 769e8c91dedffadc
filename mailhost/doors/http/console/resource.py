"""/console: one resource that dispatches by path, with the rules every page shares.

- Every page but the login form and the stylesheet needs a logged-in session; a GET without
  one is sent to /console/login.
- Every POST must carry its session's CSRF token (the hidden `csrf` field every form has);
  without the session or the token it gets 403 and changes nothing. SameSite=Strict keeps
  other sites' requests from carrying the cookie in the first place; the token also stops
  a same-site page (another service on this host name) from posting as the admin.
- The Content-Security-Policy allows styles from this site only ('self': console.css),
  nothing else: no script, no inline style, no images, no frames (the charts are inline SVG
  drawn on the server).
- Slow work (the spool, the event log, the suppression list) runs on the disk threads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from html import escape
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mailhost.doors.http.console.context import ConsoleContext, Refused, Response, redirect
from mailhost.doors.http.console.dashboard import dashboard
from mailhost.doors.http.console.layout import page
from mailhost.doors.http.console.login import client_of, log_in, log_out, login_form
from mailhost.doors.http.console.queue import message_details, message_page, queue_action, queue_list, read_envelopes
from mailhost.doors.http.console.sessions import COOKIE, Session
from mailhost.doors.http.console.suppressions import change_suppression, suppressions_csv, suppressions_page
from mailhost.queue.spool import SpoolError, is_queue_id

log = Logger(namespace="mailhost.console")

CSS = (Path(__file__).parent / "console.css").read_bytes()
CSP = (b"default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
FIELD_LIMIT = 4096  # characters of any one form or query field


class ConsoleResource(Resource):
    isLeaf = True

    def __init__(self, context: ConsoleContext) -> None:
        super().__init__()
        self.context = context

    def render(self, request: Any) -> int:
        request.setHeader(b"Content-Security-Policy", CSP)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(response: Response) -> None:
            if gone:
                return
            request.setResponseCode(response.code)
            request.setHeader(b"Content-Type", response.content_type)
            for name, value in response.headers.items():
                request.setHeader(name, value)
            request.write(response.body)
            request.finish()

        def failed(failure: Failure) -> Response:
            if failure.check(Refused):
                return Response(page("Refused", f"<p>{escape(failure.value.text)}</p>"), failure.value.code)
            log.failure("console: {method} {path}", failure, method=request.method.decode("ascii", "replace"),
                        path=request.path[:80].decode("ascii", "replace"))
            return Response(page("Something went wrong", "<p>The console could not answer; see mailhost's log.</p>"), 500)

        Deferred.fromCoroutine(self._answer(request)).addErrback(failed).addCallback(answer)
        return NOT_DONE_YET

    async def _answer(self, request: Any) -> Response:
        ctx = self.context
        path = [segment.decode("utf-8", "replace") for segment in request.postpath]
        method = request.method
        if method not in (b"GET", b"HEAD", b"POST"):
            raise Refused(405, "Method not allowed.")
        if not path:
            return redirect("/console/")
        name = path[0]
        if name == "console.css" and len(path) == 1:
            return Response(CSS, content_type=b"text/css; charset=utf-8")
        fields = _fields(request.args)
        session = ctx.sessions.get(request.getCookie(COOKIE))
        client = client_of(request)
        if method == b"POST" and (session is None or not session.csrf_matches(fields.get("csrf"))):
            # No session, or not this session's token: a forged or stale form.
            log.info("console: POST /console/{name} refused (no valid CSRF token) client=[{client}]",
                     name=name[:40], client=client)
            raise Refused(403, "This form has expired or did not come from the console. Reload the page and try again.")
        if name == "login" and len(path) == 1:
            if method != b"POST":
                if session is not None and session.user:
                    return redirect("/console/")
                session = session or ctx.sessions.new()
                return _with_cookie(login_form(session), session)
            assert session is not None
            new, response = await log_in(ctx, session, fields, client)
            return _with_cookie(response, new) if new is not None else response
        if session is None or not session.user:
            if method == b"POST":
                raise Refused(403, "Log in first.")
            return redirect("/console/login")
        route = self._route(path, method == b"POST")
        if route is None:
            raise Refused(404, "No such page.")
        response = await route(session, fields, client)
        if name == "logout":
            response.headers[b"Set-Cookie"] = _cookie("", expire=True)
        return response

    def _route(self, path: list[str], post: bool) -> Callable[[Session, dict[str, str], str], Awaitable[Response]] | None:
        ctx = self.context
        name, rest = path[0], path[1:]

        async def dashboard_page(session: Session, fields: dict[str, str], client: str) -> Response:
            return await dashboard(ctx, session)

        async def logout(session: Session, fields: dict[str, str], client: str) -> Response:
            return log_out(ctx, session, client)

        async def listing(session: Session, fields: dict[str, str], client: str) -> Response:
            return queue_list(ctx, session, await ctx.run(read_envelopes, ctx.spool), fields)

        async def flush_all(session: Session, fields: dict[str, str], client: str) -> Response:
            return await queue_action(ctx, session, None, fields.get("action", ""), client)

        async def message(session: Session, fields: dict[str, str], client: str) -> Response:
            queue_id = rest[0].upper()
            if not is_queue_id(queue_id):
                raise Refused(404, "No such message.")
            if post:
                return await queue_action(ctx, session, queue_id, fields.get("action", ""), client)
            try:
                details = await ctx.run(message_details, ctx.spool, ctx.events, queue_id)
            except SpoolError:
                raise Refused(404, "No such message in the queue (delivered or removed?).") from None
            return message_page(ctx, session, details)

        async def suppressions(session: Session, fields: dict[str, str], client: str) -> Response:
            if post:
                return await change_suppression(ctx, session, fields, client)
            return await suppressions_page(ctx, session, fields)

        async def export(session: Session, fields: dict[str, str], client: str) -> Response:
            return await suppressions_csv(ctx, session)

        routes: dict[tuple[str, int, bool], Callable[[Session, dict[str, str], str], Awaitable[Response]]] = {
            ("", 0, False): dashboard_page,
            ("logout", 0, True): logout,
            ("queue", 0, False): listing,
            ("queue", 0, True): flush_all,
            ("queue", 1, False): message,
            ("queue", 1, True): message,
            ("suppressions", 0, False): suppressions,
            ("suppressions", 0, True): suppressions,
            ("suppressions.csv", 0, False): export,
        }
        return routes.get((name, len(rest), post))


def _fields(args: dict[bytes, list[bytes]]) -> dict[str, str]:
    """The first value of each query or form field, as text, bounded."""
    return {key.decode("utf-8", "replace")[:100]: values[0].decode("utf-8", "replace")[:FIELD_LIMIT]
            for key, values in list(args.items())[:50] if values}


def _cookie(value: str, expire: bool = False) -> bytes:
    """The session cookie: sent back over HTTPS only, never to scripts, never with a request
    another site starts, and only to /console (the unsubscribe pages never see it)."""
    tail = "; Max-Age=0" if expire else ""
    return f"{COOKIE.decode()}={value}; Path=/console; Secure; HttpOnly; SameSite=Strict{tail}".encode("ascii")


def _with_cookie(response: Response, session: Session) -> Response:
    response.headers[b"Set-Cookie"] = _cookie(session.id)
    return response
