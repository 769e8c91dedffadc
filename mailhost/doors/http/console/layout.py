"""The console's page frame, forms and tables. Everything that comes from data is escaped
here or by the caller with html.escape; no inline style or script (the CSP allows neither)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from html import escape

from mailhost.doors.http.console.sessions import Session

NAV = (("/console/", "Dashboard"), ("/console/queue", "Queue"), ("/console/suppressions", "Suppressions"))


def when(epoch: float | None) -> str:
    """A UTC time as the console shows it."""
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def span(seconds: float) -> str:
    """A duration, short: 45s, 12m, 3h 5m, 2d 4h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def csrf_field(session: Session) -> str:
    return f'<input type="hidden" name="csrf" value="{escape(session.csrf)}">'


def button_form(action: str, session: Session, label: str, fields: dict[str, str] | None = None,
                css: str = "") -> str:
    """A POST form that is one button (with hidden fields and the CSRF token)."""
    hidden = "".join(f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in (fields or {}).items())
    kind = f' class="{escape(css)}"' if css else ""
    return (f'<form method="post" action="{escape(action)}" class="inline">{csrf_field(session)}{hidden}'
            f'<button type="submit"{kind}>{escape(label)}</button></form>')


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], css: str = "") -> str:
    """A table; the cells of `rows` are HTML the caller has escaped, the headers are text."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    kind = f' class="{escape(css)}"' if css else ""
    return f"<table{kind}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str, session: Session | None = None) -> bytes:
    """A whole console page; `body` is HTML the caller has escaped."""
    nav = ""
    notices = ""
    if session is not None and session.user:
        links = "".join(f'<a href="{href}">{escape(text)}</a>' for href, text in NAV)
        nav = (f'<nav>{links}<span class="who">{escape(session.user)}</span>'
               f'{button_form("/console/logout", session, "Log out")}</nav>')
        notices = "".join(f'<p class="notice">{escape(n)}</p>' for n in session.notice)
        session.notice.clear()
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{escape(title)} - mailhost</title><link rel="stylesheet" href="/console/console.css"></head>'
            f'<body><header><span class="brand">mailhost</span>{nav}</header>'
            f'<main><h1>{escape(title)}</h1>{notices}{body}</main></body></html>\n').encode("utf-8")
