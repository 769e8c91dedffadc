"""The event log: what happened to the mail, for campaign tools (webhooks) and the API.

Events are delivered, deferred, bounced, complained, unsubscribed and suppressed
(config.WEBHOOK_EVENTS). Each is one JSON line in `state_dir/events/events.jsonl`
with a unique, time-ordered `id`, appended under an exclusive `flock` (every process
of the daemon and the command line append to the same file) and fsync'd before
`record` returns: an event recorded is never lost, whatever happens next.

Everything here blocks (file I/O): the daemon calls it on its disk threads.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mailhost.config import WEBHOOK_EVENTS
from mailhost.ops.ownership import Owner, give, make_dirs, owner_of

LOG_NAME = "events.jsonl"

_sequence = itertools.count()


def new_event_id(now: float) -> str:
    """Sortable by time (microseconds, then a per-process sequence), unique across processes
    (a random tail): a receiver may drop a second copy of an id it has seen."""
    return f"{int(now * 1_000_000):014x}{next(_sequence) % 0x10000:04x}{secrets.token_hex(4)}"


class EventLog:
    def __init__(self, folder: Path, owner: Owner | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOG_NAME
        self.owner = owner  # the CLI run as root: files go to the daemon's user
        self._mutex = threading.Lock()

    def record(self, kind: str, *, queue_id: str = "", recipient: str = "", sender: str = "", message_id: str = "",
               now: float | None = None, **details: Any) -> dict[str, Any]:
        """Append one event and make it durable; returns it as stored."""
        if kind not in WEBHOOK_EVENTS:
            raise ValueError(f"not an event kind ({', '.join(WEBHOOK_EVENTS)}): {kind!r}")
        now = time.time() if now is None else now
        event = {"id": new_event_id(now), "event": kind, "time": round(now, 6), "queue_id": queue_id,
                 "recipient": recipient, "sender": sender, "message_id": message_id, **details}
        line = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
        with self._mutex:
            make_dirs(self.folder, 0o700, self.owner)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                give(self.path, self.owner)
                fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time: lines never interleave
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return event

    def read(self, after: str = "") -> Iterator[dict[str, Any]]:
        """The events recorded after the one with id `after` ("" for all), in order. A line
        cut short by a crash mid-write is skipped."""
        try:
            stream = open(self.path, "rb")
        except FileNotFoundError:
            return
        with stream:
            for line in stream:
                if not line.endswith(b"\n"):
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and str(event.get("id", "")) > after:
                    yield event


def event_log(state_dir: Path) -> EventLog:
    """The daemon's and the CLI's shared log: state_dir/events/."""
    return EventLog(Path(state_dir) / "events", owner=owner_of(Path(state_dir)))
