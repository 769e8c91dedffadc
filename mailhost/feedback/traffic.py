"""The mail flow per minute over the last 24 hours, for the web console's charts.

What is counted, once each, where it happens:

- `received`: a message committed by the one intake path (mailhost.intake.cleanup), whatever
  its door;
- `delivered:<group>`, `deferred:<class>`, `bounced:<class>`, `complained:<group>`: each
  delivery or complaint event as the event log writes it (mailhost.feedback.events calls
  `count_events` with what it stored), by destination group (the `[[throttle]]` group of the
  MX that answered, else the recipient's provider: the caller's `group` function) or by bounce
  class (mailhost.feedback.classify).

Every process counts in memory (any thread) and adds its counts to one small file,
`state_dir/traffic.json`, every FLUSH_SECONDS and when it stops: a read-modify-write under
an exclusive flock on `traffic.json.lock`, the file replaced atomically, as
mailhost.feedback.complaints does. So with `[server] workers` the figures are the sum of
every process's, and they survive a restart.

The file stays bounded: minute buckets older than 24 hours are dropped at each flush, and at
most MAX_GROUPS destination groups are kept apart (a campaign to ten thousand small domains
adds the rest up under "other"); bounce classes are a fixed set.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from mailhost.ops.durable import write_file_atomically
from mailhost.ops.ownership import Owner
from mailhost.ops.statelock import exclusive

log = Logger(namespace="mailhost.traffic")

FILE_NAME = "traffic.json"
BUCKET_SECONDS = 60
WINDOW_SECONDS = 24 * 3600
BUCKETS = WINDOW_SECONDS // BUCKET_SECONDS
FLUSH_SECONDS = 60.0
MAX_GROUPS = 20  # destination groups kept apart; more are added up under OTHER
OTHER = "other"
KINDS = ("received", "delivered", "deferred", "bounced", "complained")
_EVENT_KINDS = {"delivered": "group", "complained": "group", "deferred": "class", "bounced": "class"}

# (recipient, remote MTA host name) -> destination group name
GroupOf = Callable[[str, str], str]


def _series_key(kind: str, part: str = "") -> str:
    return f"{kind}:{part}" if part else kind


class Traffic:
    """This process's counts, and the shared per-minute figures in `path`."""

    def __init__(self, path: Path, group: GroupOf, owner: Owner | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.group = group
        self.owner = owner
        self.clock = clock
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._mutex = threading.Lock()  # the pending counts (reactor thread, disk threads)
        self._flushing = threading.Lock()  # one read-modify-write at a time within the process
        self._pending: dict[tuple[int, str], int] = {}  # (minute, series key) -> count
        self._cache: tuple[Any, dict[str, dict[str, int]]] | None = None

    # -- counting (cheap; any thread)

    def received(self, count: int = 1) -> None:
        self._add([("received", count)])

    def count_events(self, events: Iterable[dict[str, Any]]) -> None:
        """Count the delivery and complaint events the event log has just stored."""
        found = []
        for event in events:
            kind = event.get("event")
            by = _EVENT_KINDS.get(str(kind))
            if by == "group":
                part = self.group(str(event.get("recipient", "")), str(event.get("remote_mta", "")))
            elif by == "class":
                part = str(event.get("class") or "other")
            else:
                continue
            found.append((_series_key(str(kind), _clean(part)), 1))
        if found:
            self._add(found)

    def _add(self, counts: list[tuple[str, int]]) -> None:
        minute = self._minute(self.clock())
        with self._mutex:
            for key, count in counts:
                self._pending[(minute, key)] = self._pending.get((minute, key), 0) + count

    @staticmethod
    def _minute(now: float) -> int:
        return int(now // BUCKET_SECONDS) * BUCKET_SECONDS

    # -- the shared figures (blocking)

    def flush(self) -> int:
        """Add this process's counts to the file (blocking); how many counts were added."""
        with self._mutex:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        with self._flushing, exclusive(self._lock_path, self.owner):
            minutes = self._read()
            groups = {key.partition(":")[2] for counts in minutes.values() for key in counts
                      if key.startswith(("delivered:", "complained:"))}
            for (minute, key), count in pending.items():
                kind, _, part = key.partition(":")
                if kind in ("delivered", "complained") and part not in groups:
                    if len(groups) >= MAX_GROUPS:
                        key = _series_key(kind, OTHER)
                    else:
                        groups.add(part)
                bucket = minutes.setdefault(str(minute), {})
                bucket[key] = bucket.get(key, 0) + count
            oldest = self._minute(self.clock()) - WINDOW_SECONDS
            minutes = {m: c for m, c in minutes.items() if int(m) > oldest}
            encoded = json.dumps({"version": 1, "minutes": minutes}, separators=(",", ":"), sort_keys=True)
            write_file_atomically(self.path, encoded.encode("utf-8") + b"\n", 0o600, self.owner)
        return sum(pending.values())

    def series(self) -> tuple[int, dict[str, list[int]]]:
        """(the first minute, epoch seconds; each series' count per minute for the BUCKETS
        minutes from it, the newest last): the file's figures and this process's counts not
        yet flushed."""
        now_minute = self._minute(self.clock())
        first = now_minute - (BUCKETS - 1) * BUCKET_SECONDS
        found: dict[str, list[int]] = {}

        def add(minute: int, key: str, count: int) -> None:
            index = (minute - first) // BUCKET_SECONDS
            if 0 <= index < BUCKETS:
                found.setdefault(key, [0] * BUCKETS)[index] += count

        for minute, counts in self._cached().items():
            for key, count in counts.items():
                add(int(minute), key, count)
        with self._mutex:
            pending = dict(self._pending)
        for (minute, key), count in pending.items():
            add(minute, key, count)
        return first, dict(sorted(found.items()))

    def _read(self) -> dict[str, dict[str, int]]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError) as error:
            log.warn("{path}: unreadable ({error}); the traffic figures start again", path=str(self.path), error=error)
            raw = {}
        return _valid(raw)

    def _cached(self) -> dict[str, dict[str, int]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return {}
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._cache is None or self._cache[0] != identity:
            self._cache = (identity, self._read())
        return self._cache[1]


def _clean(part: str) -> str:
    """A group or class as a series name: bounded, no separator."""
    return part.replace(":", "_")[:80] or OTHER


def _valid(raw: Any) -> dict[str, dict[str, int]]:
    """The file's minute buckets with every part of the expected shape (a damaged part is dropped)."""
    minutes = raw.get("minutes") if isinstance(raw, dict) else None
    if not isinstance(minutes, dict):
        return {}
    return {str(m): {str(k): n for k, n in counts.items() if type(n) is int and n >= 0}
            for m, counts in minutes.items() if str(m).isdigit() and isinstance(counts, dict)}


def traffic(state_dir: Path, group: GroupOf, owner: Owner | None = None) -> Traffic:
    """The daemon's shared figures: state_dir/traffic.json."""
    return Traffic(Path(state_dir) / FILE_NAME, group, owner=owner)
