"""Log output: the daemon's text lines, and observers for twistd's --logger option.

    twistd -n mailhost --config ...                                   text lines on stdout
    twistd -n --logger=mailhost.ops.logs.json_lines mailhost --config ...  JSON lines on stdout

Without --logger, --logfile or --syslog, `twistd -n mailhost` writes twistd's
own text lines to stdout, but through `BatchedStream`: the lines logged in one
turn of the reactor go out in one write instead of one write and flush each
(a busy daemon logs two or three lines per message). Either way each
message's lines start with its queue id.
"""

from __future__ import annotations

import atexit
import functools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from twisted.logger import FileLogObserver, ILogObserver, formatEventAsClassicLogText, jsonFileLogObserver

BATCH_LIMIT = 64 * 1024  # characters held before they are written anyway
ATOMIC_WRITE = 4096  # bytes per write at most (PIPE_BUF), unless one line is longer


_streams: list[BatchedStream] = []


def flush_pending() -> None:
    """Write the held lines now: called before an SMTP reply goes to a client, so that
    the log already has the line about it (a script may grep for the queue id at once)."""
    for stream in _streams:
        if stream._held:
            stream.flush_now()


class BatchedStream:
    """A text stream whose writes from the reactor thread are held until the
    reactor's current turn ends, then written and flushed together. Writes from
    other threads, before the reactor runs, or past BATCH_LIMIT go out at once
    (with what is held, in order). Held lines are written at shutdown and exit."""

    def __init__(self, stream: TextIO, reactor: Any) -> None:
        self.stream = stream
        self.encoding = getattr(stream, "encoding", "utf-8")  # tells FileLogObserver this takes text
        self._reactor = reactor
        self._held: list[str] = []
        self._size = 0
        self._scheduled = False
        self._lock = threading.Lock()
        self._reactor_thread = threading.main_thread()
        reactor.addSystemEventTrigger("after", "shutdown", self.flush_now)
        atexit.register(self.flush_now)
        _streams.append(self)

    def write(self, text: str) -> None:
        with self._lock:
            self._held.append(text)
            self._size += len(text)
            later = (self._size < BATCH_LIMIT and self._reactor.running
                     and threading.current_thread() is self._reactor_thread)
            if later and not self._scheduled:
                self._scheduled = True
                self._reactor.callLater(0, self._turn_ended)
        if not later:
            self.flush_now()

    def flush(self) -> None:
        """FileLogObserver flushes after every event: the real flush waits for the end of the turn."""

    def _turn_ended(self) -> None:
        self._scheduled = False
        self.flush_now()

    def flush_now(self) -> None:
        with self._lock:
            if not self._held:
                return
            held = self._held
            self._held = []
            self._size = 0
            try:
                for text in _whole_lines(held, ATOMIC_WRITE):
                    self.stream.write(text)
                    self.stream.flush()
            except (OSError, ValueError):
                pass  # stdout gone (closed pipe at exit): nothing left to tell


def _whole_lines(parts: list[str], limit: int) -> Iterator[str]:
    """The held lines joined into writes of at most `limit` bytes (a longer line alone):
    the workers share the main process's stdout, and a pipe keeps writes of up to PIPE_BUF
    bytes whole, so no process's line is cut by another's."""
    chunk: list[str] = []
    size = 0
    for part in parts:
        length = len(part) if part.isascii() else 4 * len(part)  # UTF-8 takes at most 4 bytes a character
        if chunk and size + length > limit:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(part)
        size += length
    if chunk:
        yield "".join(chunk)


def twistd_time(when: float | None) -> str:
    """twistd's timestamp format, made once per second rather than once per line."""
    return "-" if when is None else _local_second(int(when))


@functools.lru_cache(maxsize=1)
def _local_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))


def classic_line(event: dict, clock: Callable[[float | None], str]) -> str | None:
    """formatEventAsClassicLogText's line, made with str.format_map (in C) when the event allows:
    Twisted's own formatter parses the format string in Python for every line. Events with a
    traceback, or a format str.format_map cannot do ("{f()}" calls), take Twisted's way."""
    form = event.get("log_format")
    if not isinstance(form, str) or "log_failure" in event:
        return formatEventAsClassicLogText(event, clock)
    try:
        text = form.format_map(event)
    except Exception:
        return formatEventAsClassicLogText(event, clock)
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
    return f"{clock(event.get('log_time'))} [{system}] {text.replace(chr(10), chr(10) + chr(9))}\n"


def worker_system(event: dict, worker: int) -> str:
    """The "system" of a worker's line: "mailhost.outbound#info worker 1", which process wrote it."""
    level = event.get("log_level")
    return f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')} worker {worker}"


def text_lines(stream: TextIO, reactor: Any, worker: int | None = None) -> ILogObserver:
    """twistd's classic text lines ("<time> [<namespace>#<level>] <text>"), batched per reactor turn.
    A worker's lines say which ("[mailhost.outbound#info worker 1]")."""
    clock = twistd_time
    if worker is None:
        return FileLogObserver(BatchedStream(stream, reactor), lambda event: classic_line(event, clock))

    def worker_line(event: dict) -> str | None:
        if "log_system" not in event:
            event = {**event, "log_system": worker_system(event, worker)}
        return classic_line(event, clock)

    return FileLogObserver(BatchedStream(stream, reactor), worker_line)


def default_observer(twistd_options: Any, reactor: Any) -> ILogObserver | None:
    """The observer for `twistd -n mailhost` logging to stdout; None when twistd was told where
    or how to log (--logger, --logfile, --syslog, or not -n), so that twistd's own choice stands."""
    if twistd_options is None:
        return None
    get = getattr(twistd_options, "get", lambda key, default=None: default)
    if get("logger") or get("syslog") or not get("nodaemon") or get("logfile") not in (None, "", "-"):
        return None
    return text_lines(sys.stdout, reactor)


def json_lines() -> ILogObserver:
    """JSON lines on standard output, batched per reactor turn."""
    from twisted.internet import reactor

    return jsonFileLogObserver(BatchedStream(sys.stdout, reactor))
