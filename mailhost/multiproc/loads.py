"""How many SMTP sessions each process of `[server] workers = N` has open, in memory they share.

The processes accept on the same listening sockets (mailhost.multiproc.accept). Each
publishes its count of open sessions into its own slot whenever it changes; before
accepting, a process reads the others' slots, and one with more sessions than another
leaves the new connection to that one for a moment. So ten connections that a campaign
tool opens one after another spread five and five, however the kernel orders the
wake-ups (with bursts counted alone, 6/4 in two of three campaign runs: bench/README.md).

The memory is a memfd the main process creates and passes to each worker as an inherited
descriptor (an unlinked temporary file where memfd_create does not exist). One int32 a
process; each slot has one writer (its process) and aligned 4-byte stores are atomic, so
no lock: a reader sees the old count or the new one. ABSENT marks a process that is not
accepting (a worker not started yet, or ended): nobody waits for it.
"""

from __future__ import annotations

import mmap
import os
import tempfile

ABSENT = -1
_SLOT = 4  # bytes: one int32 a process


class SessionLoads:
    """Slot `index` of `count` is this process's; the others are read only."""

    def __init__(self, fd: int, count: int, index: int) -> None:
        if not 0 <= index < count:
            raise ValueError(f"slot {index} of {count}")
        self._fd = fd
        self.count = count
        self.index = index
        self._map = mmap.mmap(fd, count * _SLOT)
        self._slots = memoryview(self._map).cast("i")

    @classmethod
    def create(cls, count: int) -> SessionLoads:
        """The main process's (slot 0, at 0 sessions); every worker's slot ABSENT until it accepts."""
        try:
            fd = os.memfd_create("mailhost-session-loads", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            with tempfile.TemporaryFile() as stand_in:
                fd = os.dup(stand_in.fileno())
        try:
            os.ftruncate(fd, count * _SLOT)
            loads = cls(fd, count, 0)
        except BaseException:
            os.close(fd)
            raise
        for slot in range(1, count):
            loads._slots[slot] = ABSENT
        return loads

    @classmethod
    def attach(cls, fd: int, count: int, index: int) -> SessionLoads:
        """A worker's view of the main process's memory, through the descriptor it inherited."""
        if os.fstat(fd).st_size < count * _SLOT:
            raise ValueError(f"descriptor {fd} holds fewer than {count} slots")
        return cls(fd, count, index)

    def fileno(self) -> int:
        return self._fd

    def publish(self, sessions: int) -> None:
        """This process has `sessions` open now."""
        self._slots[self.index] = max(0, sessions)

    def mark_absent(self, index: int) -> None:
        """Process `index` accepts nothing (the main process says so when a worker ends)."""
        self._slots[index] = ABSENT

    def fewest_elsewhere(self) -> int | None:
        """The fewest sessions another accepting process has open; None when no other accepts."""
        others = [load for slot, load in enumerate(self._slots) if slot != self.index and load != ABSENT]
        return min(others, default=None)

    def close(self) -> None:
        self._slots.release()
        self._map.close()
        os.close(self._fd)
