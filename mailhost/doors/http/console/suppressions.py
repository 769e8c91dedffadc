"""/console/suppressions: search, add, remove, and the list as CSV (the columns of
`mailhost suppress export`, so the file imports back with `mailhost suppress import`).

The list is the daemon's SuppressionList (the one file every process and the CLI share);
its calls block, so they run on the disk threads."""

from __future__ import annotations

import io
from html import escape

from twisted.logger import Logger

from mailhost.doors.http.console.context import ConsoleContext, Refused, Response, redirect
from mailhost.doors.http.console.layout import button_form, csrf_field, page, table
from mailhost.doors.http.console.sessions import Session
from mailhost.feedback.suppression import SuppressionEntry, write_csv

log = Logger(namespace="mailhost.console")

SHOWN = 500
FIELD_MAX = 500


async def suppressions_page(ctx: ConsoleContext, session: Session, query: dict[str, str]) -> Response:
    search = query.get("q", "").strip().lower()[:FIELD_MAX]
    entries: list[SuppressionEntry] = await ctx.run(ctx.suppression.entries)
    found = [e for e in entries if search in e.address or (search and search in e.scope)]
    body = [f'<form method="get" action="/console/suppressions" class="filters">'
            f'<label>Address or domain <input name="q" value="{escape(search)}"></label><button type="submit">Search</button>'
            f' <a href="/console/suppressions.csv">Export CSV</a></form>',
            f'<form method="post" action="/console/suppressions" class="filters">{csrf_field(session)}'
            '<input type="hidden" name="action" value="add">'
            '<label>Suppress <input name="address" type="email" required></label>'
            '<label>Reason <input name="reason" value="added in the console"></label>'
            '<button type="submit">Add</button></form>',
            f"<p>{len(found)} of {len(entries)} suppressed addresses"
            f"{' (the first ' + str(SHOWN) + ' shown)' if len(found) > SHOWN else ''}.</p>"]
    rows = [(escape(e.address), escape(e.category or "-"), escape(e.source), escape(e.status or "-"), escape(e.date),
             escape(e.scope or "every sender"), escape(e.reason[:200]),
             button_form("/console/suppressions", session, "Remove",
                         {"action": "remove", "address": e.address, "scope": e.scope}))
            for e in found[:SHOWN]]
    body.append(table(("Address", "Class", "Source", "Status", "Since", "For mail from", "Reason", ""), rows, "suppressions"))
    return Response(page("Suppressions", "".join(body), session))


async def change_suppression(ctx: ConsoleContext, session: Session, form: dict[str, str], client: str) -> Response:
    action = form.get("action", "")
    address = form.get("address", "").strip()[:FIELD_MAX]
    if action == "add":
        reason = form.get("reason", "").strip()[:FIELD_MAX] or "added in the console"
        try:
            await ctx.run(ctx.suppression.add, address, "5.0.0", f"{reason} (by {session.user})")
        except ValueError as e:
            session.notice.append(f"Not added: {e}")
            return redirect("/console/suppressions")
        said = f"{address} suppressed."
    elif action == "remove":
        if not await ctx.run(ctx.suppression.remove, address, form.get("scope", "")):
            session.notice.append(f"{address} was not suppressed.")
            return redirect("/console/suppressions")
        said = f"{address} may be sent to again."
    else:
        raise Refused(400, "Not a suppression action.")
    log.info("console: {user} suppression {action} <{address}> client=[{client}]", user=session.user, action=action,
             address=address, client=client)
    session.notice.append(said)
    return redirect("/console/suppressions")


async def suppressions_csv(ctx: ConsoleContext, session: Session) -> Response:
    entries = await ctx.run(ctx.suppression.entries)
    out = io.StringIO()
    write_csv(entries, out)
    log.info("console: {user} exported the suppression list ({count} entries)", user=session.user, count=len(entries))
    return Response(out.getvalue().encode("utf-8"), content_type=b"text/csv; charset=utf-8",
                    headers={b"Content-Disposition": b'attachment; filename="suppressions.csv"'})
