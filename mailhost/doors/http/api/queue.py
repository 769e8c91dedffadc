"""GET /api/v1/queue and GET /api/v1/messages/{id}: what the queue holds and what happened to
a message, read from the spool and the event log on disk.

The files are the shared truth whatever process delivers a message: with `[server] workers`,
each process updates the envelopes of its shard in the one spool after every attempt and
appends to the one event log, and `mailhost queue list` reads the same files. So the main
process (which alone serves [http]) reads them on a disk thread, never another process's memory.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from mailhost.config import BounceRule
from mailhost.doors.http.api.errors import ApiError, bad_field
from mailhost.feedback.classify import classify_reply
from mailhost.feedback.events import EventLog
from mailhost.queue.envelope import DELIVERED, PENDING
from mailhost.queue.spool import Spool, SpoolError, is_queue_id

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_EVENTS = 200  # of one message's trail
STATES = ("pending", "deferred", "held")
_EVENT_STATE = {"delivered": "delivered", "bounced": "failed", "deferred": "deferred"}


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def event_id_at(epoch: float) -> str:
    """An event id below every event recorded from `epoch` on (ids start with the time in µs)."""
    return f"{max(0, int(epoch * 1_000_000)):014x}"


def _recipient(raw: dict[str, Any], rules: tuple[BounceRule, ...]) -> dict[str, Any]:
    state = str(raw.get("state", PENDING))
    reply, status = str(raw.get("last_reply", "")), str(raw.get("status", ""))
    failed_or_late = state != DELIVERED and bool(reply or status)
    return {"address": raw.get("address", ""), "state": state, "attempts": raw.get("attempts", 0),
            "last_reply": reply, "status": status,
            "class": classify_reply(status, reply, rules=rules) if failed_or_late else "",
            "remote_mta": raw.get("remote_mta", "")}


def summary(envelope: dict[str, Any], rules: tuple[BounceRule, ...]) -> dict[str, Any]:
    """One queued message as the API shows it, from its envelope's JSON (queue.envelope)."""
    return {"id": envelope["id"], "sender": envelope["sender"], "arrival": iso(envelope["arrival"]),
            "next_attempt": iso(envelope["next_attempt"]), "held": bool(envelope.get("held", False)),
            "client": envelope.get("client", ""),
            "recipients": [_recipient(r, rules) for r in envelope["recipients"]]}


def _state_of(envelope: dict[str, Any]) -> str:
    if envelope.get("held"):
        return "held"
    return "deferred" if any(r.get("attempts", 0) for r in envelope["recipients"]) else "pending"


def queue_query(args: dict[bytes, list[bytes]]) -> dict[str, Any]:
    from mailhost.doors.http.api.events import int_param, text_param

    state = text_param(args, "state", 20)
    if state is not None and state not in STATES:
        raise bad_field("state", f"state is one of {', '.join(STATES)}")
    return {"state": state, "sender": (text_param(args, "sender") or "").lower() or None,
            "domain": (text_param(args, "domain", 255) or "").lower().rstrip(".") or None,
            "limit": int_param(args, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)}


def list_queue(spool: Spool, rules: tuple[BounceRule, ...], state: str | None = None, sender: str | None = None,
               domain: str | None = None, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """The queued messages that match, oldest first, at most `limit` (blocking: a disk thread).
    `state`: pending (never tried), deferred (tried, waiting to retry), held; `domain`: a
    recipient's domain."""
    found = []
    for envelope in spool.raw_envelopes():
        try:
            if state is not None and _state_of(envelope) != state:
                continue
            if sender is not None and str(envelope["sender"]).lower() != sender:
                continue
            if domain is not None and not any(str(r["address"]).lower().rpartition("@")[2] == domain
                                              for r in envelope["recipients"]):
                continue
            found.append((float(envelope["arrival"]), envelope))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # not an envelope mailhost wrote: `mailhost queue list` reports those
    found.sort(key=lambda item: item[0])
    shown = []
    for _, envelope in found[:limit]:
        try:
            shown.append(summary(envelope, rules))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            continue
    return {"messages": shown, "total": len(found), "truncated": len(found) > limit}


def message_status(spool: Spool, events: EventLog | None, queue_id: str, rules: tuple[BounceRule, ...],
                   lookback: float, now: float | None = None) -> dict[str, Any]:
    """Each recipient's state, attempts, last reply and class, and the message's event trail
    (blocking: a disk thread). A message still queued is read from its envelope; one that has
    left the queue (every recipient delivered or bounced) from the events of the last
    `lookback` seconds. ApiError 404 when neither knows it."""
    if not is_queue_id(queue_id):
        raise ApiError(404, "not_found", "no such message: a message id is 16 letters and digits, as POST gave it")
    now = time.time() if now is None else now
    try:
        envelope = spool.load(queue_id)
    except SpoolError:
        envelope = None
    trail: list[dict[str, Any]] = []
    if events is not None:
        since = event_id_at((envelope.arrival if envelope is not None else now - lookback) - 1)
        reader = events.read(after=since, containing=queue_id.encode("ascii"))
        try:
            trail = [e for e in reader if e.get("queue_id") == queue_id]
        finally:
            reader.close()
    if envelope is None and not trail:
        raise ApiError(404, "not_found", f"no message {queue_id} in the queue or in the events of the last "
                                         f"{lookback / 86400:g} days")
    recipients: dict[str, dict[str, Any]] = {}
    for event in trail:
        state = _EVENT_STATE.get(str(event.get("event")))
        if state is None:
            continue
        recipients[event.get("recipient", "")] = {
            "address": event.get("recipient", ""), "state": state, "attempts": event.get("attempts", 0),
            "last_reply": event.get("reply", ""), "status": event.get("status", ""), "class": event.get("class", ""),
            "remote_mta": event.get("remote_mta", "")}
    result: dict[str, Any] = {"id": queue_id, "queued": envelope is not None}
    if envelope is not None:
        queued = summary({"id": envelope.id, "sender": envelope.sender, "arrival": envelope.arrival,
                          "next_attempt": envelope.next_attempt, "held": envelope.held, "client": envelope.client,
                          "recipients": [vars(r) for r in envelope.recipients]}, rules)
        for recipient in queued.pop("recipients"):
            recipients[recipient["address"]] = recipient  # the envelope is the newest word
        result.update(queued)
    else:
        result["sender"] = next((e.get("sender", "") for e in trail if e.get("sender")), "")
    result["recipients"] = list(recipients.values())
    result["events"] = trail[-MAX_EVENTS:]
    return result
