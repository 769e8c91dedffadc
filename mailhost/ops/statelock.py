"""One daemon per state_dir: an flock(2) on state_dir/mailhost.lock, held for the daemon's life.

The kernel releases the lock when the process ends, however it ends (kill -9, a crash, a
reboot), so nothing stale can keep the next start from taking it. (Twisted's PID lock next to
the control socket was a symlink naming a pid: after a reboot, or while a killed daemon was
not yet reaped, that pid could be alive and the daemon would not start.)
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mailhost.ops.ownership import Owner, give, make_dirs

LOCK_NAME = "mailhost.lock"


class AlreadyRunning(Exception):
    """Another process holds the lock; str() is the one line to show."""


class StateLock:
    """The held lock: keep it for as long as the daemon runs (closing the descriptor releases it)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    def write_pid(self) -> None:
        """Note our pid in the file, for the message another start shows (again after a fork)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lock_state_dir(state_dir: Path, owner: Owner | None = None) -> StateLock:
    """Take the state_dir lock without waiting; AlreadyRunning names the process that holds it."""
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunning(f"another mailhost runs with state_dir {state_dir} (pid {pid})") from None
    give(path, owner)
    lock = StateLock(fd, path)
    lock.write_pid()
    return lock


@contextmanager
def exclusive(path: Path, owner: Owner | None = None) -> Iterator[None]:
    """Hold an exclusive flock(2) on `path` (made, with its folder, for `owner` when missing)
    for the body: one writer at a time across processes for a read-modify-write of a file
    next to it (the suppression list, the complaint figures)."""
    make_dirs(path.parent, 0o700, owner)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        give(path, owner)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock
