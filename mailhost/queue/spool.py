"""The durable outbound queue on disk, and its in-memory index of due times.

Layout under state_dir/spool:

    msg/<hh>/<id>        the message, stored once however many recipients (LF lines)
    env/<hh>/<id>.json   its envelope (mailhost.queue.envelope.Envelope as JSON)
    tmp/                 writes in progress; anything here at start is debris

<hh> is the first two characters of the id, so 100,000 messages spread over
1,024 folders. A message is committed when its envelope is renamed into env/:
the message file is written and fsync'd first, so at start a message file
without an envelope is an interrupted write and is removed. Every envelope
update is a new file renamed over the old one.

The methods here block on the disk; the daemon calls them through DiskWriter.
"""

from __future__ import annotations

import base64
import heapq
import json
import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from mailhost.ops.durable import fsync_directory, write_and_sync
from mailhost.ops.ownership import Owner, make_dirs
from mailhost.queue.envelope import Envelope


class SpoolError(Exception):
    """A queue id that is not in the spool, or a spool entry that cannot be read."""


class MessageMissing(SpoolError):
    """An envelope whose message file is gone: what a removal interrupted by a crash leaves."""


# Queue ids need to be unique, not secret: one seed from the OS per process rather than a
# getrandom() system call per message (76 us each under bench/inbound.py's profile).
_random = random.Random(os.urandom(32))


def new_queue_id() -> str:
    """A short unique id (80 random bits, base32): logs, Received: id, the 250 text and the spool file names."""
    return base64.b32encode(_random.getrandbits(80).to_bytes(10, "big")).decode("ascii")


def is_queue_id(text: str) -> bool:
    """Whether `text` has the shape new_queue_id gives (16 base32 characters), so it is safe in a path."""
    return len(text) == 16 and all(c in _BASE32 for c in text)


_BASE32 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


class Spool:
    def __init__(self, root: Path, owner: Owner | None = None) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.owner = owner  # the CLI run as root: what it writes goes to the daemon's user
        self._known_dirs: set[Path] = set()

    # --- paths -----------------------------------------------------------------

    def message_path(self, queue_id: str) -> Path:
        return self.root / "msg" / queue_id[:2] / queue_id

    def envelope_path(self, queue_id: str) -> Path:
        return self.root / "env" / queue_id[:2] / f"{queue_id}.json"

    def _ensure_dir(self, path: Path) -> None:
        if path not in self._known_dirs:
            make_dirs(path, 0o700, self.owner)
            self._known_dirs.add(path)

    # --- writing (blocking) ----------------------------------------------------

    def store(self, envelope: Envelope, chunks: Iterable[bytes]) -> None:
        """Commit a new message durably: message file, then envelope, both fsync'd with their folders."""
        self._ensure_dir(self.tmp)
        message_path = self.message_path(envelope.id)
        envelope_path = self.envelope_path(envelope.id)
        self._ensure_dir(message_path.parent)
        self._ensure_dir(envelope_path.parent)
        message_tmp = self.tmp / f"{envelope.id}.msg"
        write_and_sync(str(message_tmp), chunks, owner=self.owner)
        try:
            os.rename(message_tmp, message_path)
            fsync_directory(message_path.parent)
            self._write_envelope(envelope)
            fsync_directory(envelope_path.parent)
        except BaseException:
            for path in (message_tmp, message_path, envelope_path):
                _unlink(path)
            raise

    def update(self, envelope: Envelope) -> None:
        """Replace an envelope atomically (a crash leaves the old or the new one, never half)."""
        self._write_envelope(envelope)

    def _write_envelope(self, envelope: Envelope) -> None:
        self._ensure_dir(self.tmp)
        tmp = self.tmp / f"{envelope.id}.{os.getpid()}.{time.monotonic_ns()}.env"
        write_and_sync(str(tmp), [envelope.to_json()], owner=self.owner)
        os.replace(tmp, self.envelope_path(envelope.id))

    def remove(self, queue_id: str, sync: bool = True) -> None:
        """Take a message out: the envelope first (the commit point), then the message file.

        sync=False does not wait for the removal to reach the disk: for a message that was
        delivered or bounced, where a crash before it does only brings the message back for a
        second attempt (a duplicate, never a loss; Postfix does not sync its deletions either).
        The envelope may then come back without its message file: MessageMissing."""
        envelope_path = self.envelope_path(queue_id)
        try:
            os.unlink(envelope_path)
        except FileNotFoundError:
            raise SpoolError(f"{queue_id}: no such message in the queue") from None
        if sync:
            fsync_directory(envelope_path.parent)
        _unlink(self.message_path(queue_id))

    # --- reading (blocking) ----------------------------------------------------

    def load(self, queue_id: str) -> Envelope:
        try:
            return Envelope.from_json(self.envelope_path(queue_id).read_bytes())
        except FileNotFoundError:
            raise SpoolError(f"{queue_id}: no such message in the queue") from None
        except (ValueError, TypeError, KeyError) as e:
            raise SpoolError(f"{queue_id}: unreadable envelope ({e})") from None

    def load_with_message(self, queue_id: str) -> tuple[Envelope, bytes]:
        """Envelope and message in one call: one thread trip per delivery attempt."""
        return self.load(queue_id), self.read_message(queue_id)

    def read_message(self, queue_id: str) -> bytes:
        try:
            return self.message_path(queue_id).read_bytes()
        except FileNotFoundError:
            raise MessageMissing(f"{queue_id}: message file missing") from None

    def ids(self) -> Iterator[str]:
        """Every committed queue id (unordered)."""
        env = self.root / "env"
        if not env.is_dir():
            return
        for folder in os.scandir(env):
            if folder.is_dir():
                for entry in os.scandir(folder.path):
                    if entry.name.endswith(".json"):
                        yield entry.name[:-5]

    def raw_envelopes(self) -> Iterator[dict]:
        """Every readable envelope as its JSON dict: the fast path for listing and
        start-up (no objects, no pathlib: 100,000 of these are read at start)."""
        env = os.path.join(self.root, "env")
        if not os.path.isdir(env):
            return
        for folder in os.scandir(env):
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder.path):
                if entry.name.endswith(".json"):
                    try:
                        with open(entry.path, "rb") as f:
                            yield json.loads(f.read())
                    except (OSError, ValueError):
                        continue  # removed meanwhile, or unreadable: `recover` and `load` say so

    def envelope_files(self) -> list[str]:
        """The path of every committed envelope, in the order raw_envelopes reads them
        (one scan of env/, no stat): split it up and hand the parts to read_raw_envelopes."""
        env = os.path.join(self.root, "env")
        paths: list[str] = []
        if not os.path.isdir(env):
            return paths
        for folder in os.scandir(env):
            if not folder.is_dir():
                continue
            paths.extend(entry.path for entry in os.scandir(folder.path) if entry.name.endswith(".json"))
        return paths

    @staticmethod
    def read_raw_envelopes(paths: list[str]) -> list[tuple[int, dict]]:
        """(position in `paths`, JSON dict) of each readable envelope among `paths`; files removed
        meanwhile and unreadable ones are left out, as raw_envelopes does.

        Built for `queue list` of 100,000 messages, where system calls are what costs: one open
        (relative to its open folder), one read and one close per file (no fstat, no seek), and
        the JSON decoder called directly (json.loads itself only for what it does not take)."""
        opened, read, close, rdonly = os.open, os.read, os.close, os.O_RDONLY
        decode = json.JSONDecoder().raw_decode
        envelopes: list[tuple[int, dict]] = []
        folder, folder_fd = None, -1
        try:
            for index, path in enumerate(paths):
                where, _, name = path.rpartition(os.sep)
                if where != folder:  # names relative to the open folder: no walk of the whole path per file
                    if folder_fd >= 0:
                        close(folder_fd)
                    folder, folder_fd = where, -1
                    try:
                        folder_fd = opened(where, rdonly | os.O_DIRECTORY)
                    except OSError:
                        pass
                if folder_fd < 0:
                    continue
                try:
                    fd = opened(name, rdonly, dir_fd=folder_fd)
                    try:
                        data = read(fd, 65536)
                        if len(data) == 65536:  # a big envelope (hundreds of recipients): read to the end
                            parts = [data]
                            while part := read(fd, 65536):
                                parts.append(part)
                            data = b"".join(parts)
                    finally:
                        close(fd)
                except OSError:
                    continue
                try:
                    text = data.decode("utf-8")
                    envelope, end = decode(text)
                    if end != len(text):
                        raise ValueError("more after the JSON value")
                except (ValueError, RecursionError):  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
                    try:
                        envelope = json.loads(data)  # a BOM, white space around, another encoding ...
                    except (ValueError, RecursionError):
                        continue
                if type(envelope) is dict:
                    envelopes.append((index, envelope))
        finally:
            if folder_fd >= 0:
                close(folder_fd)
        return envelopes

    def envelopes(self) -> Iterator[Envelope]:
        """Every readable envelope; unreadable ones are skipped (see `recover`)."""
        for queue_id in self.ids():
            try:
                yield self.load(queue_id)
            except SpoolError:
                continue

    def recover(self) -> list[str]:
        """Clean up after a crash; returns what was removed, for the log.

        Removes writes in progress (tmp/) and message files whose envelope was
        never committed; those messages were never acknowledged.
        """
        removed = []
        if self.tmp.is_dir():
            for entry in os.scandir(self.tmp):
                _unlink(Path(entry.path))
                removed.append(f"tmp/{entry.name}")
        msg = self.root / "msg"
        if msg.is_dir():
            committed = set(self.ids())  # one scan of env/, not a stat per message
            for folder in os.scandir(msg):
                for entry in os.scandir(folder.path):
                    if entry.name not in committed:
                        _unlink(Path(entry.path))
                        removed.append(f"msg/{folder.name}/{entry.name}")
        return removed


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class DueIndex:
    """Which queued messages are due when: a heap with lazy deletion.

    Holds only ids and times (not envelopes), so 100,000 queued messages
    cost a few tens of MB.
    """

    def __init__(self) -> None:
        self._due: dict[str, float] = {}
        self._held: set[str] = set()
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._due) + len(self._held)

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._due or queue_id in self._held

    def schedule(self, queue_id: str, when: float) -> None:
        self._held.discard(queue_id)
        self._due[queue_id] = when
        heapq.heappush(self._heap, (when, queue_id))

    def hold(self, queue_id: str) -> None:
        self._due.pop(queue_id, None)
        self._held.add(queue_id)

    def is_held(self, queue_id: str) -> bool:
        return queue_id in self._held

    def discard(self, queue_id: str) -> None:
        self._due.pop(queue_id, None)
        self._held.discard(queue_id)

    def take(self, queue_id: str) -> None:
        """Remove from the due times while a delivery is running (it is re-scheduled after)."""
        self._due.pop(queue_id, None)

    def next_time(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> str | None:
        self._drop_stale()
        if self._heap and self._heap[0][0] <= now:
            _, queue_id = heapq.heappop(self._heap)
            del self._due[queue_id]
            return queue_id
        return None

    def all_due(self) -> list[str]:
        return list(self._due)

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
