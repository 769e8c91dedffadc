"""Getting bytes onto disk so that a crash cannot lose them.

The rule (DESIGN.md): write to a temporary name, fsync the file, rename it into
place, fsync the directory. `DiskWriter` runs that work on its own thread pool
so the reactor never waits on the disk; fsyncs from concurrent sessions run in
parallel threads, and the filesystem journal commits them together (measured:
one thread trip per message beat a separate group-commit round for the
directory by 40% on one session).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailhost.ops.ownership import Owner

T = TypeVar("T")


def fsync_directory(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _libc_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.syncfs  # Linux 2.6.39; reports write-back errors since 5.8
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    return function


_SYNCFS = _libc_syncfs()


def sync_filesystem(path: str | Path) -> None:
    """Make everything written to `path`'s file system durable: file data, and the names
    made by create and rename (syncfs(2): one journal commit for all of it). Where the C
    library has no syncfs, os.sync() does the same for every file system."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error), str(path))
    finally:
        os.close(fd)


def write_unsynced(path: str, chunks: Iterable[bytes], mode: int = 0o600, owner: Owner | None = None) -> None:
    """Create `path` (which must not exist) and write `chunks`, leaving the fsync to a
    GroupSync batch. Removes it on failure."""
    _create(path, chunks, mode, owner, sync=False)


def write_and_sync(path: str, chunks: Iterable[bytes], mode: int = 0o600, owner: Owner | None = None) -> None:
    """Create `path` (which must not exist), write `chunks`, fsync. Removes it on failure.
    With `owner` (we run as root), the file is given to the owner of state_dir first."""
    _create(path, chunks, mode, owner, sync=True)


def _create(path: str, chunks: Iterable[bytes], mode: int, owner: Owner | None, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            if owner is not None:
                owner.give_fd(fd)
            _write_all(fd, list(chunks))
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(path)
        raise


def _write_all(fd: int, chunks: list[bytes]) -> None:
    # One writev for all the chunks (a Maildir copy is its header lines and the body):
    # one system call, and one trip out of and back into the GIL, for the usual case.
    written = os.writev(fd, chunks)
    for chunk in chunks:
        if written >= len(chunk):
            written -= len(chunk)
            continue
        view = memoryview(chunk)[written:]  # a short write: finish one chunk at a time
        written = 0
        while view:
            view = view[os.write(fd, view) :]


def write_file_atomically(path: Path, data: bytes, mode: int = 0o600, owner: Owner | None = None) -> None:
    """Replace `path` with `data` durably (blocking; for the command line), given to `owner`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _unlink_quietly(str(temporary))
    write_and_sync(str(temporary), [data], mode, owner)
    try:
        os.replace(temporary, path)
    except BaseException:
        _unlink_quietly(str(temporary))
        raise
    fsync_directory(path.parent)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class BackgroundThread(threading.Thread):
    """A thread that does not take the CPU from the reactor when it wakes (SCHED_BATCH:
    Linux runs it at the next tick or when a core is free, with the same share of the CPU).

    A thread woken for disk work preempts the reactor thread by default, and then waits
    for the interpreter lock the reactor still holds: on a busy machine each wake-up cost
    the reactor a context switch and its place on the core (measured on a draining queue:
    15,800 involuntary switches of the reactor threads for 5,000 messages, 4,900 with these)."""

    def run(self) -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except (AttributeError, OSError):
            pass  # not Linux (or refused): an ordinary thread
        super().run()


class _BackgroundPool(ThreadPool):
    threadFactory = BackgroundThread  # ThreadPool's hook for the threads it starts


class DiskWriter:
    """A dedicated pool of threads for blocking work: the disk's by default
    (the daemon runs a second, small one for password checks).

    background=True: its threads are BackgroundThreads. The daemon's disk pools (the intake's
    commits, the queue runner's loads and removals) are: the reactor keeps its core while a
    commit waits for a free one, which on two busy cores was the faster of the two for the
    250 as well (bench/README.md). The password checks and the content checks keep ordinary
    threads (CPU work; as background threads they gained nothing measurable)."""

    def __init__(self, reactor: IReactorThreads, threads: int = 8, name: str = "mailhost-disk",
                 background: bool = False) -> None:
        self._reactor = reactor
        self._pool = (_BackgroundPool if background else ThreadPool)(minthreads=1, maxthreads=threads, name=name)
        self._together: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run blocking work off the reactor thread."""
        return deferToThreadPool(self._reactor, self._pool, function, *args)

    def run_together(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Like run, but the calls made in one turn of the reactor share one thread trip
        (run in order, each with its own result): for short work that many messages need
        at once, such as loading and removing queue entries while a queue drains."""
        deferred: Deferred[T] = Deferred()
        self._together.append((function, args, deferred))
        if len(self._together) == 1:
            self._reactor.callLater(0, self._run_together)  # type: ignore[attr-defined]
        return deferred

    def _run_together(self) -> None:
        batch, self._together = self._together, []

        def work() -> list[tuple[bool, Any]]:
            results: list[tuple[bool, Any]] = []
            for function, args, _ in batch:
                try:
                    results.append((True, function(*args)))
                except BaseException:
                    results.append((False, Failure()))
            return results

        def deliver(results: list[tuple[bool, Any]]) -> None:
            for (_, _, deferred), (ok, value) in zip(batch, results):
                if ok:
                    deferred.callback(value)
                else:
                    deferred.errback(value)

        def lost(failure: Failure) -> None:  # the pool itself failed (stopped)
            for _, _, deferred in batch:
                deferred.errback(failure)

        self.run(work).addCallbacks(deliver, lost)


@dataclass(frozen=True)
class Staged:
    """Files written under temporary names, not yet durable (a GroupSync batch's first step)."""

    publish: Callable[[], None]  # renames them into place
    undo: Callable[[], None]  # removes whatever of them staging and publishing left


@dataclass(frozen=True)
class _Work:
    stage: Callable[[], Staged]
    done: Deferred[None]


class GroupSync:
    """Group commit: the messages that arrive together share two file system syncs instead
    of paying three fsyncs each (measured here: 10 together cost a tenth of the time each).

    A batch is committed the way one file is, file by file, with fsync: every piece writes
    its files under temporary names (`stage`), one sync_filesystem makes their data durable,
    then every piece renames its files into place (`Staged.publish`), and a second sync makes
    the names durable. Only then do the pieces' Deferreds fire, so a caller acknowledges
    nothing before its own bytes are on disk, and a crash at any instant leaves no
    half-written file under a final name.

    While `batches` batches are on their threads, new work collects for the next one. A
    piece that fails fails alone; when a sync fails, no piece of the batch counts as done:
    each one's undo runs and its Deferred fails."""

    def __init__(self, run: Callable[..., Deferred[Any]], path: Path, batches: int = 2) -> None:
        self._run = run  # a DiskWriter's run
        self._path = path  # on the file system every piece writes to: the one synced
        self._batches = batches
        self._running = 0
        self._pending: list[_Work] = []

    def submit(self, stage: Callable[[], Staged]) -> Deferred[None]:
        """Run `stage` (blocking, on a disk thread) in the next batch; fires once what it
        staged is in place and durable."""
        done: Deferred[None] = Deferred()
        self._pending.append(_Work(stage, done))
        if self._running < self._batches:
            self._start()
        return done

    def _start(self) -> None:
        batch, self._pending = self._pending, []
        self._running += 1
        self._run(self._commit, batch).addBoth(self._committed, batch)

    def _commit(self, batch: list[_Work]) -> list[Failure | None]:
        outcomes: list[Failure | None] = []  # None: done
        staged: list[Staged | None] = []
        for each in batch:
            try:
                staged.append(each.stage())
                outcomes.append(None)
            except BaseException:
                staged.append(None)
                outcomes.append(Failure())
        if not any(s is not None for s in staged):
            return outcomes
        try:
            sync_filesystem(self._path)
            for index, piece in enumerate(staged):
                if piece is None:
                    continue
                try:
                    piece.publish()
                except BaseException:
                    outcomes[index] = Failure()
                    staged[index] = None
                    _undo_quietly(piece)
            if any(s is not None for s in staged):
                sync_filesystem(self._path)
        except OSError:
            failure = Failure()
            for piece in staged:
                if piece is not None:
                    _undo_quietly(piece)
            return [failure for _ in batch]
        return outcomes

    def _committed(self, outcomes: list[Failure | None] | Failure, batch: list[_Work]) -> None:
        self._running -= 1
        if isinstance(outcomes, Failure):  # the pool itself failed (stopped)
            outcomes = [outcomes] * len(batch)
        for each, failure in zip(batch, outcomes):
            each.done.callback(None) if failure is None else each.done.errback(failure)
        if self._pending and self._running < self._batches:
            self._start()


def _undo_quietly(piece: Staged) -> None:
    try:
        piece.undo()
    except OSError:
        pass  # left for Spool.recover; never acknowledged either way
