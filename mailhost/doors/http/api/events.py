"""GET /api/v1/events?since=ID&limit=N: the events the webhooks carry (delivered, deferred,
bounced, complained, unsubscribed, suppressed), from the on-disk log every process appends
to (mailhost.feedback.events), oldest first. A client keeps the `next` it got and asks with
since=next to get what came after; an id older than the log keeps (it is bounded) gives
what is left from the oldest on."""

from __future__ import annotations

import itertools
import re
from typing import Any

from mailhost.doors.http.api.errors import bad_field
from mailhost.feedback.events import EventLog

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_EVENT_ID = re.compile(r"[0-9a-f]{0,40}")


def int_param(args: dict[bytes, list[bytes]], name: str, default: int, low: int, high: int) -> int:
    """A whole-number query parameter between `low` and `high`; 400 naming it otherwise."""
    values = args.get(name.encode("ascii"))
    if not values:
        return default
    text = values[-1].decode("ascii", "replace")
    if not text.isdigit() or not low <= int(text) <= high:
        raise bad_field(name, f"{name} must be a whole number from {low} to {high}")
    return int(text)


def text_param(args: dict[bytes, list[bytes]], name: str, limit: int = 320) -> str | None:
    values = args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        text = values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise bad_field(name, f"{name} must be UTF-8") from None
    if len(text) > limit or not text.isprintable():
        raise bad_field(name, f"{name} must be printable and at most {limit} characters")
    return text


def read_events(log: EventLog, since: str, limit: int) -> dict[str, Any]:
    """Up to `limit` events after id `since` (blocking: a disk thread)."""
    reader = log.read(after=since)
    try:
        events = list(itertools.islice(reader, limit))
    finally:
        reader.close()  # closes the segment files it has open
    return {"events": events, "next": events[-1]["id"] if events else since}


def events_query(args: dict[bytes, list[bytes]]) -> tuple[str, int]:
    since = text_param(args, "since", 40) or ""
    if not _EVENT_ID.fullmatch(since):
        raise bad_field("since", "since is the id of an event (lower-case hex), as `next` gave it")
    return since, int_param(args, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
