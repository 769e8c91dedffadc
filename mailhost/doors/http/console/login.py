"""/console/login and /console/logout.

The password is checked through the same twisted.cred portal as SMTP AUTH (scrypt on the
AUTH thread pool, a dummy hash for a name that is no user), after the same kind of per-address
slow-down (mailhost.local.auth.AuthSlowdown: each failure past the free ones doubles the wait
before the next check). A user without the admin flag (`mailhost user admin`) is refused with
the same words as a wrong password. Neither the password nor the session id is ever logged.
"""

from __future__ import annotations

from html import escape
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mailhost.doors.http.console.context import ConsoleContext, Response, redirect
from mailhost.doors.http.console.layout import csrf_field, page
from mailhost.doors.http.console.sessions import Session
from mailhost.local.auth import IMailSubmitter

log = Logger(namespace="mailhost.console")

MAX_FIELD = 1024  # characters of an address or password taken from the form


def login_form(session: Session, problem: str = "", address: str = "") -> Response:
    said = f'<p class="problem">{escape(problem)}</p>' if problem else ""
    return Response(page("Log in", (
        f'{said}<form method="post" action="/console/login" class="login">{csrf_field(session)}'
        f'<label>Address <input name="address" type="email" autocomplete="username" required value="{escape(address)}"></label>'
        '<label>Password <input name="password" type="password" autocomplete="current-password" required></label>'
        '<button type="submit">Log in</button></form>'
        "<p>Console access is for mailhost users made admins with <code>mailhost user admin ADDRESS</code>.</p>")),
        401 if problem else 200)


async def log_in(ctx: ConsoleContext, session: Session, form: dict[str, str], client: str) -> tuple[Session | None, Response]:
    """Check the form's address and password: (the new logged-in session, a redirect to the
    dashboard), or (None, the form again with the problem)."""
    address = form.get("address", "")[:MAX_FIELD].strip().lower()
    password = form.get("password", "")[:MAX_FIELD]
    credentials = UsernamePassword(address.encode("utf-8"), password.encode("utf-8"))
    delay = ctx.slowdown.delay(client)
    if delay > 0:
        checking = deferLater(ctx.reactor, delay, ctx.portal.login, credentials, None, IMailSubmitter)
    else:
        checking = maybeDeferred(ctx.portal.login, credentials, None, IMailSubmitter)
    try:
        _, avatar, _ = await checking
        user: str = avatar.address
    except UnauthorizedLogin:
        user = ""
    entry = ctx.domains.user(user) if user else None
    if entry is None or not entry.admin:
        failures = ctx.slowdown.failed(client)
        # The name is logged only when its password was right (an admin flag missing): a mistyped
        # password may have landed in the name box.
        log.info("console login failed client=[{client}] user={user} address_failures={failures}",
                 client=client, user=user or "-", failures=failures)
        return None, login_form(session, "Wrong address or password, or not a console admin.", address)
    ctx.sessions.drop(session)
    new = ctx.sessions.new(entry.address)
    log.info("console login user={user} client=[{client}]", user=entry.address, client=client)
    return new, redirect("/console/")


def log_out(ctx: ConsoleContext, session: Session, client: str) -> Response:
    ctx.sessions.drop(session)
    log.info("console logout user={user} client=[{client}]", user=session.user, client=client)
    return redirect("/console/login")


def client_of(request: Any) -> str:
    return getattr(request.getClientAddress(), "host", "") or ""
