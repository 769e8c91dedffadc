"""/console/: the last 24 hours of mail flow and the state of the queue.

Received and delivered per minute, delivered per destination group, deferrals and bounces by
class (mailhost.feedback.traffic, which survives restarts); each provider's complaint rate
against Gmail's and Yahoo's 0.1% and 0.3% (mailhost.feedback.complaints); each destination
group's current pace (mailhost.queue.operations.PaceReport, every process's); the queue's
size and its oldest message.
"""

from __future__ import annotations

import time
from html import escape

from twisted.internet.defer import maybeDeferred

from mailhost.doors.http.console.charts import bar_chart, line_chart
from mailhost.doors.http.console.context import ConsoleContext, Response
from mailhost.doors.http.console.layout import page, span, table
from mailhost.doors.http.console.queue import queue_summary
from mailhost.doors.http.console.sessions import Session
from mailhost.feedback.complaints import ERROR_RATE, WARNING_RATE
from mailhost.feedback.traffic import BUCKET_SECONDS


async def dashboard(ctx: ConsoleContext, session: Session) -> Response:
    first, series = await ctx.run(ctx.traffic.series)
    rates = await ctx.run(ctx.complaints.rates) if ctx.complaints is not None else {}
    paces = await maybeDeferred(ctx.paces.snapshot)
    size, oldest = await ctx.run(queue_summary, ctx.spool)
    width = len(next(iter(series.values()))) if series else 0

    def total_of(kind: str) -> list[int]:
        rows = [values for key, values in series.items() if key.partition(":")[0] == kind]
        return [sum(column) for column in zip(*rows)] if rows else [0] * width

    def by(kind: str) -> dict[str, list[int]]:
        return {key.partition(":")[2]: values for key, values in series.items() if key.partition(":")[0] == kind}

    flow = {"received": series.get("received", [0] * width), "delivered": total_of("delivered")}
    totals = {kind: sum(total_of(kind)) for kind in ("deferred", "bounced", "complained")}
    failures = {f"{kind} {name}": float(sum(values)) for kind in ("deferred", "bounced")
                for name, values in sorted(by(kind).items())}
    cards = [("Queue", str(size)), ("Oldest message", span(time.time() - oldest) if oldest else "-"),
             ("Received 24 h", str(sum(flow["received"]))), ("Delivered 24 h", str(sum(flow["delivered"]))),
             ("Deferred 24 h", str(totals["deferred"])), ("Bounced 24 h", str(totals["bounced"]))]
    body = ['<section class="cards">', *(f'<div class="card"><span>{escape(name)}</span><strong>{escape(value)}</strong></div>'
                                         for name, value in cards), "</section>"]
    body.append('<section id="flow"><h2>Messages received and recipients delivered per minute (24 h)</h2>')
    body.append(line_chart("Received and delivered per minute", first, BUCKET_SECONDS, flow))
    body.append('</section><section id="groups"><h2>Recipients delivered per minute by destination group</h2>')
    body.append(line_chart("Delivered per minute by destination group", first, BUCKET_SECONDS, by("delivered")))
    body.append('</section><section id="failures"><h2>Deferrals and bounces by class (24 h)</h2>')
    body.append(bar_chart("Deferrals and bounces by class", failures))
    body.append('</section><section id="complaints"><h2>Complaint rate by provider (24 h)</h2>')
    body.append(bar_chart("Complaint rate by provider", {p: r.rate for p, r in rates.items()},
                          {"0.1%": WARNING_RATE, "0.3%": ERROR_RATE}, percent=True))
    body.append(table(("Provider", "Delivered", "Complaints", "Rate"), (
        (escape(p), str(r.delivered), str(r.complaints), f"{r.rate:.3%}") for p, r in rates.items())))
    body.append("<p>Gmail and Yahoo ask bulk senders to stay under 0.1% and refuse mail above 0.3%.</p>")
    body.append('</section><section id="paces"><h2>Pace per destination group</h2>')
    body.append(table(("Group", "Now (per minute)", "At most", "Connections", "Paused"), (
        (escape(group), f"{v.get('rate', 0):.0f}", f"{v.get('max_rate', 0):.0f}", f"{v.get('connections', 0):.0f}",
         span(v["paused_for"]) if v.get("paused_for") else "-") for group, v in paces.items())))
    body.append("</section>")
    return Response(page("Dashboard", "".join(body), session))
