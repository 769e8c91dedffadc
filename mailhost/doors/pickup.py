"""Local injection: `mailhost sendmail` drops a message into the spool's
pickup folder (durably: the same promise as a 250), and the daemon collects
it from there, whether it was running at the time or starts later.

A pickup file is one JSON line (sender, recipients, who submitted it, and the
RFC 3461 requests of sendmail's -N, -R and -V when given) followed by the message. The sendmail command pokes the running daemon over
the control socket, so a message is on its way within a second; the daemon
also collects at start and on a slow timer, for a poke that found it down.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailhost.feedback.dsn import build_dsn
from mailhost.intake.cleanup import Incoming, Intake, Receipt, Refused
from mailhost.intake.origin import SENDMAIL, Origin
from mailhost.ops.durable import DiskWriter, fsync_directory, write_and_sync
from mailhost.ops.ownership import make_dirs, owner_of
from mailhost.queue.envelope import FAILED, Envelope, Recipient
from mailhost.queue.spool import new_queue_id
from mailhost.smtp.wire import ENVID_MAX, Reply

log = Logger(namespace="mailhost.pickup")


@dataclass(frozen=True)
class PickupEntry:
    path: Path
    sender: str
    recipients: list[str]
    submitter: str  # "uid 1000 (alice)"
    message: bytes
    notify: list[str] | None = None  # RFC 3461 NOTIFY for every recipient (sendmail -N)
    ret: str | None = None  # sendmail -R
    envid: str | None = None  # sendmail -V


def pickup_dir(state_dir: Path) -> Path:
    return state_dir / "spool" / "pickup"


def drop(state_dir: Path, sender: str, recipients: list[str], submitter: str, message: bytes,
         dsn: dict[str, object] | None = None) -> str:
    """Write a message into the pickup folder durably; returns its pickup id. `dsn`: "notify",
    "ret", "envid" (RFC 3461), each only when given."""
    folder = pickup_dir(state_dir)
    owner = owner_of(state_dir)  # sendmail run as root: the daemon's user must read what it drops
    make_dirs(folder, 0o700, owner)
    pickup_id = new_queue_id()
    head = json.dumps({"sender": sender, "recipients": recipients, "submitter": submitter, "time": time.time(),
                       **(dsn or {})})
    temporary = folder / f".{pickup_id}.tmp"
    write_and_sync(str(temporary), [head.encode("utf-8"), b"\n", message], owner=owner)
    os.rename(temporary, folder / pickup_id)
    fsync_directory(folder)
    return pickup_id


@dataclass
class Scan:
    """What one look at the pickup folder found: complete messages, oldest first, and a log
    line for each thing that could not be taken (a file that cannot be read is set aside)."""

    entries: list[PickupEntry]
    problems: list[str]


def scan(state_dir: Path) -> Scan:
    """Read the pickup folder (blocking; run on a disk thread). Nothing here is lost: a file
    that cannot be read or parsed is moved aside as spool/pickup-bad-<name>, and said so."""
    folder = pickup_dir(state_dir)
    try:
        remove_stale_temporaries(state_dir)
        entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    except FileNotFoundError:
        return Scan([], [])
    except OSError as e:
        # A folder made by root (an older sendmail run as root): sendmail's mail waits in it.
        return Scan([], [f"cannot read {folder}: {e.strerror}{_whose(folder)}; mail from sendmail waits there"])
    found, problems = [], []
    for entry in sorted(entries, key=_mtime):
        path = Path(entry.path)
        try:
            data = path.read_bytes()
            head, _, message = data.partition(b"\n")
            meta = json.loads(head)
            found.append(PickupEntry(path, meta["sender"], list(meta["recipients"]), meta.get("submitter", ""), message,
                                     _notify(meta.get("notify")), _word(meta.get("ret"), ("FULL", "HDRS")),
                                     _text(meta.get("envid"))))
            continue
        except FileNotFoundError:
            continue  # taken meanwhile
        except OSError as e:
            reason = f"cannot read it: {e.strerror}{_whose(path)}"
        except (ValueError, KeyError, TypeError, AttributeError):
            reason = "not a pickup file mailhost wrote"
        # Not ours to guess at: set it aside for the operator, keep collecting.
        aside = folder.parent / f"pickup-bad-{entry.name}"
        try:
            os.replace(path, aside)
        except OSError as e:
            problems.append(f"pickup {entry.name}: {reason}; cannot set it aside either ({e.strerror}): it stays in {folder}")
            continue
        problems.append(f"pickup {entry.name}: {reason}; nothing was sent, the file is kept as {aside} "
                        f"(to send it, make it readable and move it back into {folder})")
    return Scan(found, problems)


def _notify(value: object) -> list[str] | None:
    """NOTIFY as sendmail wrote it; anything else (a hand-made file) counts as not given."""
    if isinstance(value, list) and value and all(v in ("NEVER", "SUCCESS", "FAILURE", "DELAY") for v in value):
        return [str(v) for v in value]
    return None


def _word(value: object, allowed: tuple[str, ...]) -> str | None:
    return value if isinstance(value, str) and value in allowed else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value.isascii() and value.isprintable() and 0 < len(value) <= ENVID_MAX else None


def _mtime(entry: os.DirEntry) -> float:
    try:
        return entry.stat().st_mtime
    except OSError:
        return 0.0


def _whose(path: Path) -> str:
    """ " (owned by uid 0, this daemon runs as uid 998)" when that explains a permission error."""
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return ""
    return f" (owned by uid {uid}, this daemon runs as uid {os.geteuid()})" if uid != os.geteuid() else ""


def remove_stale_temporaries(state_dir: Path, older_than: float = 3600.0) -> None:
    """A sendmail killed mid-write leaves a dot-file; it was never acknowledged."""
    folder = pickup_dir(state_dir)
    if not folder.is_dir():
        return
    now = time.time()
    for entry in os.scandir(folder):
        if entry.name.startswith(".") and now - entry.stat().st_mtime > older_than:
            os.unlink(entry.path)


class PickupCollector:
    """Moves pickup files into the mail flow through the one intake path."""

    def __init__(self, state_dir: Path, writer: DiskWriter, intake: Intake, hostname: str) -> None:
        self.state_dir = state_dir
        self.writer = writer
        self.intake = intake
        self.hostname = hostname
        self._running: Deferred[None] | None = None
        self._again = False
        self._reported: set[str] = set()  # the last scan's problems: each is logged once, not every few seconds

    def collect(self) -> Deferred[None]:
        """Collect everything waiting; a call during a run makes it run once more after."""
        if self._running is not None:
            self._again = True
            return self._running
        self._running = Deferred.fromCoroutine(self._collect_all())
        self._running.addErrback(lambda failure: log.failure("collecting pickup failed", failure))

        def done(_: object) -> None:
            self._running = None
            if self._again:
                self._again = False
                self.collect()

        self._running.addBoth(done)
        return self._running

    async def _collect_all(self) -> None:
        found = await self.writer.run(scan, self.state_dir)
        for problem in found.problems:
            if problem not in self._reported:
                log.error("{problem}", problem=problem)
        self._reported = set(found.problems)
        for entry in found.entries:
            await self._take(entry)

    async def _take(self, entry: PickupEntry) -> None:
        origin = Origin(SENDMAIL, submitter=entry.submitter)
        incoming = Incoming(entry.sender, entry.recipients, entry.message, body_8bit=not entry.message.isascii(),
                            ret=entry.ret, envid=entry.envid,
                            notify={r: entry.notify for r in entry.recipients} if entry.notify else {})
        try:
            receipt = await self.intake.receive(incoming, origin)
        except Refused as e:
            # The whole message is refused (a mail loop): it goes back to its sender.
            receipt = Receipt("", 0, 0, [(address, e.reply) for address in entry.recipients])
        if receipt.local or receipt.queued:
            log.info("{id}: accepted from=<{sender}> to={rcpts} size={size} via=sendmail submitter={who}",
                     id=receipt.queue_id, sender=entry.sender,
                     rcpts=",".join(f"<{r}>" for r in entry.recipients if r not in dict(receipt.refused)),
                     size=len(entry.message), who=entry.submitter)
        if receipt.refused and entry.sender:
            await self._bounce(entry, receipt.refused)
        await self.writer.run(os.unlink, entry.path)

    async def _bounce(self, entry: PickupEntry, refused: list[tuple[str, Reply]]) -> None:
        """What sendmail checked may have changed before the daemon collected it (a user removed,
        an address suppressed): those recipients go back to the sender in a DSN."""
        now = time.time()
        failed = [Recipient(address, state=FAILED, status=reply.status, last_reply=f"{reply.code} {reply.status} {reply.text}",
                            notify=entry.notify)
                  for address, reply in refused]
        failed = [r for r in failed if r.wants("FAILURE")]  # RFC 3461 4.1 (sendmail -N)
        if not failed:
            return
        envelope = Envelope(self.intake.shard.new_queue_id(), entry.sender, failed, now, now, client=entry.submitter,
                            ret=entry.ret, envid=entry.envid)
        bounce = build_dsn(envelope, failed, entry.message, hostname=self.hostname, kind="failure", now=now)
        bounce_id = await self.intake.notify(entry.sender, bounce)
        for address, reply in refused:
            log.info("{id}: to=<{rcpt}> status=bounced ({reply}) notification={bounce}", id=envelope.id, rcpt=address,
                     reply=f"{reply.code} {reply.status} {reply.text}", bounce=bounce_id)
