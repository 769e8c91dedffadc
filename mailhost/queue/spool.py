"""The durable outbound queue on disk, and its in-memory index of due times.

Layout under state_dir/spool:

    msg/<hh>/<id>        the message, stored once however many recipients (LF lines)
    env/<hh>/<id>.json   its envelope (mailhost.queue.envelope.Envelope as JSON)
    tmp/                 writes in progress; anything here at start is debris
    corrupt/<id>.json    an envelope that could not be read (empty, cut short, not an
    corrupt/<id>         envelope), set aside with its message by the daemon at start

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
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

from mailhost.ops.durable import Staged, fsync_directory, write_and_sync, write_unsynced
from mailhost.ops.ownership import Owner, make_dirs
from mailhost.queue.envelope import Envelope


class SpoolError(Exception):
    """A queue id that is not in the spool, or a spool entry that cannot be read."""


class MessageMissing(SpoolError):
    """An envelope whose message file is gone: what a removal interrupted by a crash leaves."""


class CorruptEnvelope(SpoolError):
    """An envelope file that cannot be used: empty, cut short, garbage, or not an envelope."""

    def __init__(self, queue_id: str, reason: str) -> None:
        super().__init__(f"{queue_id}: unreadable envelope ({reason})")
        self.queue_id = queue_id
        self.reason = reason


# What each field of an envelope's JSON must be for the queue to schedule it (raw_envelope_problem).
_NUMBER = (int, float)
_REQUIRED = (("id", (str,)), ("sender", (str,)), ("recipients", (list,)), ("arrival", _NUMBER),
             ("next_attempt", _NUMBER))


def raw_envelope_problem(envelope: object, name: str, folder: str | None = None) -> str | None:
    """Why a decoded envelope file named `name` (the id, without .json) in env/`folder`/ cannot
    be scheduled; None when it can. Cheap (no Envelope object): the daemon asks it of every
    envelope at start."""
    if folder is not None and folder != name[:2]:
        return f"not in its folder env/{name[:2]}/"
    if type(envelope) is not dict:
        return f"not an envelope: a JSON {type(envelope).__name__}, not an object"
    for key, kinds in _REQUIRED:
        value = envelope.get(key)
        if type(value) not in kinds:
            return f"not an envelope: no {key}" if value is None else f"not an envelope: {key} is {value!r:.40}"
    if envelope["id"] != name:
        return f"its id {envelope['id']!r:.40} is not its file name"
    for recipient in envelope["recipients"]:
        if type(recipient) is not dict or type(recipient.get("address")) is not str:
            return f"not an envelope: recipient {recipient!r:.60}"
    return None


def envelope_file_problem(data: bytes, name: str) -> str | None:
    """Why the bytes of envelope file `name` cannot be used as an envelope; None when they can.
    The thorough check (an Envelope is built): for `queue list` and the daemon's log."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:
        return decode_problem(data, e)
    problem = raw_envelope_problem(raw, name)
    if problem is not None:
        return problem
    try:
        Envelope.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        return f"not an envelope: {e}"
    return None


def decode_problem(data: bytes, error: BaseException) -> str:
    """The reason, for the log and `queue list`, that `data` did not decode as JSON."""
    if not data.strip():
        return "empty file" if not data else "blank file"
    if isinstance(error, json.JSONDecodeError) and (
            error.msg.startswith("Unterminated string") or error.pos >= len(error.doc.rstrip())):
        # The JSON ended where more had to come: a write cut short (a copy, a full disk, an editor).
        return f"cut short after {len(data)} bytes: {error.msg}"
    return f"not JSON: {str(error)[:120]}"


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
        # Plain strings for the paths every delivery reads and removes: building them as
        # Path objects cost more of the queue threads' time than the reads themselves.
        self._msg = os.path.join(root, "msg", "")
        self._env = os.path.join(root, "env", "")

    # --- paths -----------------------------------------------------------------

    def message_path(self, queue_id: str) -> Path:
        return Path(self._message_file(queue_id))

    def envelope_path(self, queue_id: str) -> Path:
        return Path(self._envelope_file(queue_id))

    def _message_file(self, queue_id: str) -> str:
        return f"{self._msg}{queue_id[:2]}/{queue_id}"

    def _envelope_file(self, queue_id: str) -> str:
        return f"{self._env}{queue_id[:2]}/{queue_id}.json"

    @property
    def corrupt(self) -> Path:
        """Where unreadable envelopes and their messages are set aside (quarantine)."""
        return self.root / "corrupt"

    def _ensure_dir(self, path: Path) -> None:
        if path not in self._known_dirs:
            make_dirs(path, 0o700, self.owner)
            self._known_dirs.add(path)

    # --- writing (blocking) ----------------------------------------------------

    def store(self, envelope: Envelope, chunks: Iterable[bytes]) -> None:
        """Commit a new message durably: message file, then envelope, both fsync'd with their folders.

        Both files are written and fsync'd under temporary names first, then renamed into
        place (the message before its envelope, the commit point), then both folders are
        fsync'd: three waits for the disk instead of four, since the second folder's fsync
        finds the journal already committed on the usual file systems. Until the last fsync
        returns nothing has been acknowledged: a crash before it leaves no file, a message file
        without envelope (Spool.recover removes it), or, where a file system reorders the two
        renames, an envelope without message (an unacknowledged message, dropped as
        MessageMissing); the client, told nothing, sends it again."""
        paths = self._write_temporary(envelope, chunks, write_and_sync)
        _rename_into_place(*paths)
        try:
            fsync_directory(paths[2].parent)
            fsync_directory(paths[3].parent)
        except BaseException:
            self.discard(envelope.id)
            raise

    def stage(self, envelope: Envelope, chunks: Iterable[bytes]) -> Staged:
        """Write a new message and its envelope under temporary names, without fsync, for a
        GroupSync batch: its first sync makes them durable, then `publish` renames them into
        place as store does, and its second sync makes the names durable before anyone is
        told. A crash in between leaves what store's docstring lists."""
        paths = self._write_temporary(envelope, chunks, write_unsynced)
        return Staged(partial(_rename_into_place, *paths), partial(_unlink_all, paths))

    def _write_temporary(self, envelope: Envelope, chunks: Iterable[bytes],
                         write: Callable[..., None]) -> tuple[Path, Path, Path, Path]:
        """Both files under temporary names, written with `write`; on failure neither is left.
        Returns (message temp, envelope temp, message path, envelope path)."""
        self._ensure_dir(self.tmp)
        message_path = self.message_path(envelope.id)
        envelope_path = self.envelope_path(envelope.id)
        self._ensure_dir(message_path.parent)
        self._ensure_dir(envelope_path.parent)
        message_tmp = self.tmp / f"{envelope.id}.msg"
        envelope_tmp = self.tmp / f"{envelope.id}.{os.getpid()}.{time.monotonic_ns()}.env"
        write(str(message_tmp), chunks, owner=self.owner)
        try:
            write(str(envelope_tmp), [envelope.to_json()], owner=self.owner)
        except BaseException:
            _unlink(message_tmp)
            raise
        return message_tmp, envelope_tmp, message_path, envelope_path

    def discard(self, queue_id: str) -> None:
        """Remove a message that was put in place but never acknowledged (a folder fsync failed)."""
        _unlink(self.envelope_path(queue_id))
        _unlink(self.message_path(queue_id))

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
        envelope_file = self._envelope_file(queue_id)
        try:
            os.unlink(envelope_file)
        except FileNotFoundError:
            raise SpoolError(f"{queue_id}: no such message in the queue") from None
        if sync:
            fsync_directory(Path(envelope_file).parent)
        _unlink(self._message_file(queue_id))

    # --- reading (blocking) ----------------------------------------------------

    def load(self, queue_id: str) -> Envelope:
        try:
            data = read_whole(self._envelope_file(queue_id))
        except FileNotFoundError:
            raise SpoolError(f"{queue_id}: no such message in the queue") from None
        try:
            envelope = Envelope.from_json(data)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            raise CorruptEnvelope(queue_id, envelope_file_problem(data, queue_id) or "not an envelope") from None
        if envelope.id != queue_id:
            raise CorruptEnvelope(queue_id, f"its id {envelope.id!r:.40} is not its file name")
        return envelope

    def load_with_message(self, queue_id: str) -> tuple[Envelope, bytes]:
        """Envelope and message in one call: one thread trip per delivery attempt."""
        return self.load(queue_id), self.read_message(queue_id)

    def read_message(self, queue_id: str) -> bytes:
        try:
            return read_whole(self._message_file(queue_id))
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
    def read_raw_envelopes(paths: list[str], undecodable: list[tuple[int, str]] | None = None,
                           ) -> list[tuple[int, dict]]:
        """(position in `paths`, JSON dict) of each readable envelope among `paths`; files removed
        meanwhile and unreadable ones are left out, as raw_envelopes does. Those that were read
        but are not a JSON object go into `undecodable`, if given, as (position, reason).

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
                    except (ValueError, RecursionError) as e:
                        if undecodable is not None:
                            undecodable.append((index, decode_problem(data, e)))
                        continue
                if type(envelope) is dict:
                    envelopes.append((index, envelope))
                elif undecodable is not None:
                    undecodable.append((index, f"not an envelope: a JSON {type(envelope).__name__}, not an object"))
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

    def quarantine(self, envelope_file: str | Path) -> str:
        """Move an envelope file of env/ (its path, as envelope_files gives it) and its message
        file, if any, into corrupt/, durably; returns where the envelope now is. The message goes
        first: a crash in between leaves the envelope in env/ (set aside again at the next start),
        never a message file without an envelope, which `recover` would remove."""
        source = Path(envelope_file)
        if source.parent.parent != self.root / "env" or not source.name.endswith(".json"):
            raise ValueError(f"{source} is not an envelope file of {self.root}")
        name = source.name[:-5]
        self._ensure_dir(self.corrupt)
        if is_queue_id(name):  # any other name has no message file (and is no safe path part)
            message = self.message_path(name)
            try:
                os.rename(message, self.corrupt / name)
            except FileNotFoundError:
                pass
            else:
                fsync_directory(self.corrupt)
                fsync_directory(message.parent)
        target = self.corrupt / source.name
        os.rename(source, target)
        fsync_directory(self.corrupt)
        fsync_directory(source.parent)
        return str(target)

    def corrupt_count(self) -> int:
        """How many envelopes are set aside in corrupt/ (for the metrics)."""
        try:
            with os.scandir(self.corrupt) as entries:
                return sum(1 for entry in entries if entry.name.endswith(".json"))
        except OSError:
            return 0

    def corrupt_entries(self) -> list[tuple[str, str, str]]:
        """(id, path, reason) of every envelope set aside in corrupt/, by id."""
        found = []
        try:
            with os.scandir(self.corrupt) as entries:
                names = sorted(entry.name for entry in entries if entry.name.endswith(".json"))
        except OSError:
            return []
        for file_name in names:
            path = self.corrupt / file_name
            name = file_name[:-5]
            try:
                reason = envelope_file_problem(path.read_bytes(), name) or "readable now: move it back to env/ to send it"
            except OSError as e:
                reason = f"cannot read it: {e.strerror}"
            found.append((name, str(path), reason))
        return found

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


def _rename_into_place(message_tmp: Path, envelope_tmp: Path, message_path: Path, envelope_path: Path) -> None:
    """The message first, then its envelope (the commit point); on failure neither is left."""
    try:
        os.rename(message_tmp, message_path)
        os.replace(envelope_tmp, envelope_path)
    except BaseException:
        _unlink_all((message_tmp, envelope_tmp, envelope_path, message_path))
        raise


def _unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        _unlink(path)


FIRST_READ = 65536  # most envelopes and campaign messages: one read, and the file is whole


def read_whole(path: str | Path) -> bytes:
    """The file's bytes with open, read(s) and close only: Path.read_bytes adds an fstat, an
    isatty ioctl and two seeks, and every system call on a disk thread is a hand-over of the
    interpreter lock while the reactor is busy (a queue draining hundreds of messages a second).
    A short read of a regular file is its end."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, FIRST_READ)
        if len(data) < FIRST_READ:
            return data
        parts = [data]
        want = max(os.fstat(fd).st_size - FIRST_READ + 1, FIRST_READ)  # the rest in one read, if it stayed put
        while part := os.read(fd, want):
            parts.append(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def _unlink(path: str | Path) -> None:
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
