"""/console/queue: the outbound queue, a message's page, and the operator's buttons.

The listing reads the envelopes from the spool as `mailhost queue list` does; hold, release,
flush and delete go through the same QueueOperations the control socket (`mailhost queue
...`) drives, so the running queue's index stays right (with workers, the process that holds
the message does it). A message's attempts are its delivery events in the event log.
"""

from __future__ import annotations

import itertools
from html import escape
from typing import Any

from twisted.logger import Logger

from mailhost.doors.http.console.context import ConsoleContext, Refused, Response, redirect
from mailhost.doors.http.console.layout import button_form, page, table, when
from mailhost.doors.http.console.sessions import Session
from mailhost.feedback.events import EventLog
from mailhost.queue.operations import apply_queue_action
from mailhost.queue.spool import Spool, SpoolError, is_queue_id

log = Logger(namespace="mailhost.console")

SHOWN = 500  # messages listed at most (the filters narrow it down)
HEADERS_MAX = 64 * 1024  # characters of a message's header section shown
ATTEMPTS_SCANNED = 200_000  # events read at most for a message's trail
ATTEMPTS_SHOWN = 200
STATES = ("", "pending", "deferred", "held", "failed", "delivered")
ACTIONS = {"hold": "held", "release": "released", "flush": "flushed", "delete": "deleted"}


def queue_summary(spool: Spool) -> tuple[int, float | None]:
    """(messages in the queue, arrival of the oldest) - blocking."""
    envelopes = read_envelopes(spool)
    return len(envelopes), min((e["arrival"] for e in envelopes), default=None)


def read_envelopes(spool: Spool) -> list[dict[str, Any]]:
    """Every usable envelope as its JSON, oldest first - blocking."""
    found = []
    for _, envelope in Spool.read_raw_envelopes(spool.envelope_files()):
        try:
            if isinstance(envelope["id"], str) and isinstance(envelope["recipients"], list):
                float(envelope["arrival"])
                found.append(envelope)
        except (KeyError, TypeError, ValueError):
            continue  # not an envelope mailhost wrote: `mailhost queue list` names it
    found.sort(key=lambda e: e["arrival"])
    return found


def matches(envelope: dict[str, Any], state: str, destination: str, sender: str) -> bool:
    recipients = [r for r in envelope["recipients"] if isinstance(r, dict)]
    if state == "held" and not envelope.get("held"):
        return False
    if state and state != "held" and not any(r.get("state") == state for r in recipients):
        return False
    if destination and not any(destination in str(r.get("address", "")).rpartition("@")[2].lower() for r in recipients):
        return False
    return not sender or sender in str(envelope.get("sender", "")).lower()


def queue_list(ctx: ConsoleContext, session: Session, envelopes: list[dict[str, Any]], query: dict[str, str]) -> Response:
    state = query.get("state", "") if query.get("state", "") in STATES else ""
    destination = query.get("destination", "").strip().lower()[:200]
    sender = query.get("sender", "").strip().lower()[:200]
    found = [e for e in envelopes if matches(e, state, destination, sender)]
    options = "".join(f'<option value="{s}"{" selected" if s == state else ""}>{s or "any state"}</option>' for s in STATES)
    body = [f'<form method="get" action="/console/queue" class="filters"><select name="state">{options}</select>'
            f'<label>Destination domain <input name="destination" value="{escape(destination)}"></label>'
            f'<label>Sender <input name="sender" value="{escape(sender)}"></label><button type="submit">Filter</button></form>',
            f'<p>{len(found)} of {len(envelopes)} messages{" (the first " + str(SHOWN) + " shown)" if len(found) > SHOWN else ""}. '
            f'{button_form("/console/queue", session, "Flush the queue (retry every message now)", {"action": "flush"})}</p>']
    rows = []
    for envelope in found[:SHOWN]:
        recipients = [r for r in envelope["recipients"] if isinstance(r, dict)]
        states = ", ".join(f"{n} {s}" for s, n in _count(str(r.get("state", "")) for r in recipients))
        last = next((str(r.get("last_reply", "")) for r in recipients if r.get("last_reply")), "")
        link = f'/console/queue/{escape(envelope["id"])}'
        rows.append((f'<a href="{link}">{escape(envelope["id"])}</a>', escape(str(envelope.get("sender", "")) or "<>"),
                     escape(", ".join(str(r.get("address", "")) for r in recipients[:3])
                            + (f" and {len(recipients) - 3} more" if len(recipients) > 3 else "")),
                     escape(states) + (' <span class="held">HELD</span>' if envelope.get("held") else ""),
                     escape(when(envelope.get("arrival"))), escape(when(envelope.get("next_attempt"))),
                     escape(last[:120])))
    body.append(table(("Id", "Sender", "Recipients", "State", "Arrived", "Next attempt", "Last reply"), rows, "queue"))
    return Response(page("Queue", "".join(body), session))


def _count(values: Any) -> list[tuple[str, int]]:
    counted: dict[str, int] = {}
    for value in values:
        counted[value] = counted.get(value, 0) + 1
    return sorted(counted.items())


def message_details(spool: Spool, events: EventLog | None, queue_id: str) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """(its envelope, its header section, its delivery events oldest first) - blocking.
    SpoolError when the message is not in the queue."""
    envelope = spool.load(queue_id)
    try:
        message = spool.read_message(queue_id)
    except (SpoolError, OSError):
        message = b""
    end = message.find(b"\n\n")
    headers = message[: end if end >= 0 else len(message)].decode("utf-8", "replace")[:HEADERS_MAX]
    trail: list[dict[str, Any]] = []
    if events is not None:
        # Event ids begin with their time in microseconds (hex): start at the message's arrival.
        after = f"{int(envelope.arrival * 1_000_000):014x}"
        for event in itertools.islice(events.read(after), ATTEMPTS_SCANNED):
            if event.get("queue_id") == queue_id:
                trail.append(event)
        trail = trail[-ATTEMPTS_SHOWN:]
    return vars(envelope), headers, trail


def message_page(ctx: ConsoleContext, session: Session, details: tuple[dict[str, Any], str, list[dict[str, Any]]]) -> Response:
    envelope, headers, trail = details
    queue_id = envelope["id"]
    action = f"/console/queue/{queue_id}"
    buttons = [button_form(action, session, "Release" if envelope["held"] else "Hold",
                           {"action": "release" if envelope["held"] else "hold"}),
               button_form(action, session, "Flush (retry now)", {"action": "flush"}),
               button_form(action, session, "Delete", {"action": "delete"}, css="danger")]
    facts = table(("Field", "Value"), [
        ("Sender", escape(envelope["sender"] or "<>")), ("Arrived", escape(when(envelope["arrival"]))),
        ("Next attempt", escape("held" if envelope["held"] else when(envelope["next_attempt"]))),
        ("From client", escape(envelope["client"])), ("State", "held" if envelope["held"] else "queued")], "facts")
    recipients = table(("Recipient", "State", "Attempts", "Status", "Last reply", "Remote MTA"), (
        (escape(r.address), escape(r.state), str(r.attempts), escape(r.status), escape(r.last_reply),
         escape(r.remote_mta)) for r in envelope["recipients"]), "recipients")
    attempts = table(("Time", "Event", "Recipient", "Status", "Class", "Reply", "Remote MTA"), (
        (escape(when(float(e.get("time", 0) or 0))), escape(str(e.get("event", ""))), escape(str(e.get("recipient", ""))),
         escape(str(e.get("status", ""))), escape(str(e.get("class", ""))), escape(str(e.get("reply", ""))),
         escape(str(e.get("remote_mta", "")))) for e in trail), "attempts")
    body = (f'<p class="buttons">{"".join(buttons)}</p><h2>Envelope</h2>{facts}<h2>Recipients</h2>{recipients}'
            f"<h2>Attempts</h2>{attempts if trail else '<p>No attempt yet.</p>'}"
            f'<h2>Headers</h2><pre class="headers">{escape(headers)}</pre>')
    return Response(page(f"Message {queue_id}", body, session))


async def queue_action(ctx: ConsoleContext, session: Session, queue_id: str | None, action: str,
                       client: str) -> Response:
    """hold, release, flush or delete (one message, or flush them all), then back to the page."""
    if action not in ACTIONS or (queue_id is None and action != "flush"):
        raise Refused(400, "Not a queue action.")
    if queue_id is not None and not is_queue_id(queue_id):
        raise Refused(404, "No such message.")
    try:
        count = await apply_queue_action(ctx.queue, action, queue_id)
    except SpoolError:
        raise Refused(404, "No such message (delivered or removed meanwhile?).") from None
    what = queue_id or f"{count} messages"
    log.info("console: {user} {action} {what} client=[{client}]", user=session.user, action=action, what=what,
             client=client)
    session.notice.append(f"{what}: {ACTIONS[action]}.")
    if queue_id is None or action == "delete":
        return redirect("/console/queue")
    return redirect(f"/console/queue/{queue_id}")

