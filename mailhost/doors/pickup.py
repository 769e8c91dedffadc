"""Local injection: `mailhost sendmail` drops a message into the spool's
pickup folder (durably: the same promise as a 250), and the daemon collects
it from there, whether it was running at the time or starts later.

A pickup file is one JSON line (sender, recipients, who submitted it)
followed by the message. The sendmail command pokes the running daemon over
the control socket, so a message is on its way within a second; the daemon
also collects at start and on a slow timer, for a poke that found it down.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailhost.ops.durable import fsync_directory, write_and_sync
from mailhost.queue.spool import new_queue_id

log = Logger(namespace="mailhost.pickup")


@dataclass(frozen=True)
class PickupEntry:
    path: Path
    sender: str
    recipients: list[str]
    submitter: str  # "uid 1000 (alice)"
    message: bytes


def pickup_dir(state_dir: Path) -> Path:
    return state_dir / "spool" / "pickup"


def drop(state_dir: Path, sender: str, recipients: list[str], submitter: str, message: bytes) -> str:
    """Write a message into the pickup folder durably; returns its pickup id."""
    folder = pickup_dir(state_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    pickup_id = new_queue_id()
    head = json.dumps({"sender": sender, "recipients": recipients, "submitter": submitter, "time": time.time()})
    temporary = folder / f".{pickup_id}.tmp"
    write_and_sync(str(temporary), [head.encode("utf-8"), b"\n", message])
    os.rename(temporary, folder / pickup_id)
    fsync_directory(folder)
    return pickup_id


def waiting(state_dir: Path) -> Iterator[PickupEntry]:
    """Complete pickup files, oldest first (blocking; run on a disk thread)."""
    folder = pickup_dir(state_dir)
    if not folder.is_dir():
        return
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    for entry in sorted(entries, key=lambda e: e.stat().st_mtime):
        path = Path(entry.path)
        try:
            data = path.read_bytes()
            head, _, message = data.partition(b"\n")
            meta = json.loads(head)
            yield PickupEntry(path, meta["sender"], list(meta["recipients"]), meta.get("submitter", ""), message)
        except (OSError, ValueError, KeyError):
            # Not ours to guess at: set it aside for the operator, keep collecting.
            os.replace(path, folder.parent / f"pickup-bad-{entry.name}")


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
    """Moves pickup files into the mail flow (Maildir or queue) through the Intake."""

    def __init__(self, state_dir: Path, writer: Any, intake: Any, domains: Any, hostname: str) -> None:
        self.state_dir = state_dir
        self.writer = writer
        self.intake = intake
        self.domains = domains
        self.hostname = hostname
        self._running: Deferred[None] | None = None
        self._again = False

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
        await self.writer.run(remove_stale_temporaries, self.state_dir)
        entries = await self.writer.run(lambda: list(waiting(self.state_dir)))
        for entry in entries:
            await self._take(entry)

    async def _take(self, entry: PickupEntry) -> None:
        known, unknown = [], []
        for address in entry.recipients:
            local, _, domain = address.rpartition("@")
            if self.domains.is_local(domain) and not self.domains.resolve(local, domain).found:
                unknown.append(address)
            else:
                known.append(address)
        received_from = f"from {_header_safe(entry.submitter)}"
        if known:
            queue_id = await self.intake.inject(entry.sender, known, entry.message, received_from=received_from)
            log.info("{id}: accepted from=<{sender}> to={rcpts} size={size} via=sendmail submitter={who}",
                     id=queue_id, sender=entry.sender, rcpts=",".join(f"<{r}>" for r in known),
                     size=len(entry.message), who=entry.submitter)
        if unknown and entry.sender:
            await self._bounce_unknown(entry, unknown)
        await self.writer.run(os.unlink, entry.path)

    async def _bounce_unknown(self, entry: PickupEntry, unknown: list[str]) -> None:
        from mailhost.feedback.dsn import build_dsn
        from mailhost.queue.envelope import FAILED, Envelope, Recipient

        now = time.time()
        failed = [Recipient(a, state=FAILED, status="5.1.1", last_reply="550 5.1.1 no such user here") for a in unknown]
        envelope = Envelope(new_queue_id(), entry.sender, failed, now, now, client=entry.submitter)
        bounce = build_dsn(envelope, failed, entry.message, hostname=self.hostname, kind="failure", now=now)
        bounce_id = await self.intake.inject("", [entry.sender], bounce)
        log.info("{id}: to={rcpts} status=bounced (no such user) notification={bounce}",
                 id=envelope.id, rcpts=",".join(f"<{r}>" for r in unknown), bounce=bounce_id)


def _header_safe(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:200]
