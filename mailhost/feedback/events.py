"""The event log: what happened to the mail, for campaign tools (webhooks) and the API.

Events are delivered, deferred, bounced, complained, unsubscribed and suppressed
(config.WEBHOOK_EVENTS). Each is one JSON line in `state_dir/events/events.jsonl`
with a unique, time-ordered `id`, appended under an exclusive `flock` (every process
of the daemon and the command line append to the same log) and fsync'd before
`record` returns: an event recorded is never lost, whatever happens next.

The log stays bounded. `events.jsonl` is the open segment; past SEGMENT_BYTES it is
renamed to `events-<id of its first event>.jsonl` (rotated segments never change
again). `trim` removes rotated segments older than the retention that every webhook
has passed, and the oldest ones past a size cap whatever the webhooks say: the log
holds at most about max_bytes + one segment. Every change of the set of files happens
under the lock on `events/.lock`, so a reader that lists and opens the files under the
shared lock never misses a segment being renamed.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailhost.config import WEBHOOK_EVENTS
from mailhost.message import first_field_text
from mailhost.ops.durable import fsync_directory
from mailhost.ops.ownership import Owner, give, make_dirs, owner_of

LOG_NAME = "events.jsonl"
LOCK_NAME = ".lock"
SEGMENT_PREFIX = "events-"
SEGMENT_BYTES = 8 * 1024 * 1024  # the open segment is rotated past this size
RETENTION_SECONDS = 7 * 86400  # rotated segments every webhook has passed are kept this long
MAX_BYTES = 256 * 1024 * 1024  # past this, the oldest segments go even if a webhook is behind
_ID_PREFIX = b'{"id":"'
_TAIL = 16384

_sequence = itertools.count()


def new_event_id(now: float) -> str:
    """Sortable by time (microseconds, then a per-process sequence), unique across processes
    (a random tail): a receiver may drop a second copy of an id it has seen."""
    return f"{int(now * 1_000_000):014x}{next(_sequence) % 0x10000:04x}{secrets.token_hex(4)}"


def _after(last: str, now: float) -> str:
    """A new id greater than `last` (the log's newest): the wall clock may step back."""
    candidate = new_event_id(now)
    if candidate > last:
        return candidate
    micros = int(last[:14], 16) + 1 if len(last) >= 14 and all(c in "0123456789abcdef" for c in last[:14]) else 0
    return f"{micros:014x}{candidate[14:]}"


def line_id(line: bytes) -> str | None:
    """The id of a stored line without parsing it (json.dumps puts "id" first)."""
    if not line.startswith(_ID_PREFIX):
        return None
    end = line.find(b'"', len(_ID_PREFIX))
    return line[len(_ID_PREFIX):end].decode("ascii", "replace") if end > 0 else None


def message_facts(message: bytes) -> dict[str, str]:
    """What an event tells about the message itself: its Message-ID and the campaign tool's
    campaign (listmonk's X-Listmonk-Campaign), read from the header section only."""
    return {"message_id": (first_field_text(message, "Message-ID") or "")[:998],
            "campaign": (first_field_text(message, "X-Listmonk-Campaign") or "")[:100]}


@dataclass(frozen=True)
class Trimmed:
    removed: tuple[str, ...]  # segment file names
    unread: tuple[str, ...]  # those removed (for the size cap) before every webhook had passed them


class EventLog:
    def __init__(self, folder: Path, owner: Owner | None = None, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOG_NAME
        self.owner = owner  # the CLI run as root: files go to the daemon's user
        self.segment_bytes = segment_bytes
        self._mutex = threading.Lock()
        # Told each batch once it is durable (the console's traffic figures count them here).
        self.observers: list[Callable[[list[dict[str, Any]]], None]] = []

    # --- writing -------------------------------------------------------------------

    @contextmanager
    def _locked(self, kind: int) -> Iterator[None]:
        with self._mutex:
            make_dirs(self.folder, 0o700, self.owner)
            lock_path = self.folder / LOCK_NAME
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                give(lock_path, self.owner)
                fcntl.flock(fd, kind)
                yield
            finally:
                os.close(fd)  # releases the lock

    def record(self, kind: str, *, queue_id: str = "", recipient: str = "", sender: str = "", message_id: str = "",
               now: float | None = None, **details: Any) -> dict[str, Any]:
        """Append one event and make it durable; returns it as stored."""
        [event] = self.record_many([dict(details, event=kind, queue_id=queue_id, recipient=recipient, sender=sender,
                                         message_id=message_id)], now)
        return event

    def record_many(self, events: list[dict[str, Any]], now: float | None = None) -> list[dict[str, Any]]:
        """Append several events (each a dict with "event" and its fields) with one write and
        one fsync: what one delivery attempt did to each of its recipients. Returns them as stored."""
        for given in events:
            if given.get("event") not in WEBHOOK_EVENTS:
                raise ValueError(f"not an event kind ({', '.join(WEBHOOK_EVENTS)}): {given.get('event')!r}")
        if not events:
            return []
        with self._locked(fcntl.LOCK_EX):  # one writer at a time: lines never interleave, ids only grow
            try:
                if os.stat(self.path).st_size >= self.segment_bytes:
                    self._rotate()  # before the write: the open segment always holds the newest event
            except FileNotFoundError:
                pass
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                give(self.path, self.owner)
                size = os.fstat(fd).st_size
                tail = _read_tail(fd, size) if size else self._newest_segment_tail()
                now = time.time() if now is None else now
                last = _last_id(tail)
                stored = []
                for given in events:
                    last = _after(last, now)
                    fields = {k: v for k, v in given.items() if k != "event"}
                    stored.append({"id": last, "event": given["event"], "time": round(now, 6), "queue_id": "",
                                   "recipient": "", "sender": "", "message_id": "", **fields})
                data = b"".join(json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
                                for e in stored)
                if size and not tail.endswith(b"\n"):
                    data = b"\n" + data  # a write cut short by a crash: never glue an event to it
                while data:  # a regular file takes it whole; a short write is finished, never lost
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
        for observer in self.observers:
            observer(stored)
        return stored

    def _rotate(self) -> None:
        """Rename the open segment after its first event's id (under the exclusive lock)."""
        with open(self.path, "rb") as stream:
            first = line_id(stream.readline())
        if first is None:
            return
        os.rename(self.path, self.folder / f"{SEGMENT_PREFIX}{first}.jsonl")
        fsync_directory(self.folder)

    def _segments(self) -> list[Path]:
        """The rotated segments, oldest first."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return [self.folder / n for n in sorted(n for n in names if n.startswith(SEGMENT_PREFIX) and n.endswith(".jsonl"))]

    def _newest_segment_tail(self) -> bytes:
        segments = self._segments()
        if not segments:
            return b""
        with open(segments[-1], "rb") as stream:
            return _read_tail(stream.fileno(), os.fstat(stream.fileno()).st_size)

    # --- reading -------------------------------------------------------------------

    def read(self, after: str = "", containing: bytes = b"") -> Iterator[dict[str, Any]]:
        """The events recorded after the one with id `after` ("" for all), in order, across
        segments. A line cut short by a crash mid-write is skipped. `containing`: only lines
        that hold these bytes are parsed (a cheap pre-filter, e.g. a queue id; the caller
        still checks the field)."""
        for stream in self._open_from(after):
            with stream:
                for line in stream:
                    if not line.endswith(b"\n"):
                        break  # being written: the next read has it
                    if containing and containing not in line:
                        continue
                    known = line_id(line)
                    if known is not None and known <= after:
                        continue  # cheap skip of what the caller has seen
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(event, dict) and str(event.get("id", "")) > after:
                        yield event

    def _open_from(self, after: str) -> list[IO[bytes]]:
        """The files that may hold events after `after`, opened under the shared lock."""
        if not self.folder.exists():
            return []
        with self._locked(fcntl.LOCK_SH):
            segments = self._segments()
            firsts = [p.name[len(SEGMENT_PREFIX):-len(".jsonl")] for p in segments]
            # Segment i holds ids below the first of segment i+1: skip those the caller has passed.
            start = max([i for i, first in enumerate(firsts) if first <= after], default=0)
            streams = []
            for path in [*segments[start:], self.path]:
                try:
                    streams.append(open(path, "rb"))
                except FileNotFoundError:
                    continue
            return streams

    def last_id(self) -> str:
        """The id of the newest event ("" when there is none)."""
        if not self.folder.exists():
            return ""
        with self._locked(fcntl.LOCK_SH):
            try:
                with open(self.path, "rb") as stream:
                    tail = _read_tail(stream.fileno(), os.fstat(stream.fileno()).st_size)
            except FileNotFoundError:
                tail = b""
            return _last_id(tail or self._newest_segment_tail())

    def changed(self) -> tuple[int, int, int]:
        """A cheap fingerprint of the open segment (one stat): it differs once something is appended."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return (0, 0, 0)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    # --- bounding --------------------------------------------------------------------

    def trim(self, passed: str | None, now: float | None = None, retention: float = RETENTION_SECONDS,
             max_bytes: int = MAX_BYTES) -> Trimmed:
        """Remove rotated segments older than `retention` whose events all come at or before
        `passed` (the slowest webhook's cursor; None: no webhook holds anything back), and the
        oldest segments while the log is larger than `max_bytes`."""
        now = time.time() if now is None else now
        removed: list[str] = []
        unread: list[str] = []
        if not self.folder.exists():
            return Trimmed((), ())
        with self._locked(fcntl.LOCK_EX):
            segments = self._segments()
            try:
                total = os.stat(self.path).st_size
            except FileNotFoundError:
                total = 0
            sizes = {}
            for path in segments:
                st = path.stat()
                sizes[path] = (st.st_size, st.st_mtime)
                total += st.st_size
            for index, path in enumerate(segments):
                size, written = sizes[path]
                following = segments[index + 1].name[len(SEGMENT_PREFIX):-len(".jsonl")] if index + 1 < len(segments) else None
                # Every id in this segment is below the next segment's first id (or the open segment's).
                read_by_all = passed is None or (following is not None and following <= passed) or (
                    following is None and self._newest_below(passed))
                old = now - written > retention
                if old and read_by_all:
                    pass
                elif total > max_bytes:
                    if not read_by_all:
                        unread.append(path.name)
                else:
                    break  # segments go oldest first only
                path.unlink()
                removed.append(path.name)
                total -= size
            if removed:
                fsync_directory(self.folder)
        return Trimmed(tuple(removed), tuple(unread))

    def _newest_below(self, passed: str) -> bool:
        """Whether the newest rotated segment's events all come at or before `passed`."""
        return _last_id(self._newest_segment_tail()) <= passed


def _read_tail(fd: int, size: int) -> bytes:
    """The end of a file, enough to hold its last whole line."""
    length = min(size, _TAIL)
    while True:
        tail = os.pread(fd, length, size - length)
        if length == size or tail.rfind(b"\n", 0, len(tail) - 1) >= 0:
            return tail
        length = min(size, length * 4)


def _last_id(tail: bytes) -> str:
    """The id of the last whole line in `tail` that has one."""
    for line in reversed(tail.split(b"\n")):
        known = line_id(line)
        if known is not None and line.endswith(b"}"):
            return known
    return ""


class GroupCommit:
    """The delivery events of many attempts in one write and one fsync (group commit): each
    attempt hands over a function that makes its events (it runs on the disk thread), and its
    Deferred fires once they are durable, as with a write of its own. While one batch is being
    written, the next collects; a queue draining hundreds of messages a second pays one fsync
    per batch, not one per message."""

    def __init__(self, log: EventLog, run: Callable[..., Deferred[Any]]) -> None:
        self.log = log
        self._run = run  # the disk thread pool
        self._makers: list[Callable[[], list[dict[str, Any]]]] = []
        self._waiting: list[Deferred[None]] = []
        self._writing = False

    def record(self, make: Callable[[], list[dict[str, Any]]]) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self._makers.append(make)
        self._waiting.append(done)
        if not self._writing:
            self._write()
        return done

    def _write(self) -> None:
        makers, waiting = self._makers, self._waiting
        self._makers, self._waiting = [], []
        self._writing = True

        def write() -> None:
            self.log.record_many([event for make in makers for event in make()])

        def written(result: Any) -> None:
            self._writing = False
            for done in waiting:  # each attempt's own errback logs a failure
                done.errback(result) if isinstance(result, Failure) else done.callback(None)
            if self._makers:
                self._write()

        self._run(write).addBoth(written)


def event_log(state_dir: Path) -> EventLog:
    """The daemon's and the CLI's shared log: state_dir/events/."""
    return EventLog(Path(state_dir) / "events", owner=owner_of(Path(state_dir)))
