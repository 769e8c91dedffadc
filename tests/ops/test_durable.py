"""mailhost.ops.durable: DiskWriter.run_together shares one thread trip among the calls of one reactor turn;
write_and_sync writes every chunk whole, short writes included."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from mailhost.ops.durable import DiskWriter, write_and_sync
from tests.support.scheduling import batch_threads_possible


class CountingWriter(DiskWriter):
    """Runs 'thread' work at once, counting the trips."""

    def __init__(self, reactor: Clock) -> None:
        super().__init__(reactor)  # type: ignore[arg-type]
        self.trips = 0

    def run(self, function, *args):
        self.trips += 1
        return maybeDeferred(function, *args)


def test_calls_of_one_turn_share_a_trip_and_keep_their_own_results() -> None:
    clock = Clock()
    writer = CountingWriter(clock)
    done: list = []
    order: list = []

    def work(n: int) -> int:
        order.append(n)
        if n == 2:
            raise ValueError("two is bad")
        return n * 10

    for n in range(4):
        writer.run_together(work, n).addCallbacks(done.append, lambda f: done.append(f.getErrorMessage()))
    assert done == [] and writer.trips == 0  # nothing until the turn ends
    clock.advance(0)
    assert writer.trips == 1 and order == [0, 1, 2, 3]
    assert done == [0, 10, "two is bad", 30]
    writer.run_together(work, 5).addCallback(done.append)
    clock.advance(0)
    assert writer.trips == 2 and done[-1] == 50


@pytest.mark.parametrize("short_by", [0, 1, 5, 8, 11])
def test_write_and_sync_finishes_a_short_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short_by: int) -> None:
    chunks = [b"Received: x\r\n", b"", b"body\r\n" * 3]
    whole = b"".join(chunks)
    real_writev = os.writev
    # The kernel may take less than asked (a signal, a full disk about to be reported).
    monkeypatch.setattr(os, "writev", lambda fd, buffers: real_writev(fd, [whole[: len(whole) - short_by]]))
    write_and_sync(str(tmp_path / "message"), chunks)
    assert (tmp_path / "message").read_bytes() == whole


class HeldRuns:
    """A DiskWriter.run whose 'thread trips' finish when the test says (a batch in progress)."""

    def __init__(self) -> None:
        self.trips: list = []

    def __call__(self, function, *args):
        from twisted.internet.defer import Deferred
        held: Deferred = Deferred()
        self.trips.append((function, args, held))
        return held

    def finish(self, index: int = 0) -> None:
        function, args, held = self.trips.pop(index)
        held.callback(function(*args))


def staged_file(folder: Path, name: str, log: list, content: str = "queued"):
    """A stage function as the spool's: write under a temporary name, rename on publish."""
    from mailhost.ops.durable import Staged

    def stage() -> Staged:
        (folder / f"{name}.tmp").write_text(content)
        log.append(f"write {name}")

        def publish() -> None:
            os.rename(folder / f"{name}.tmp", folder / name)
            log.append(f"publish {name}")

        def undo() -> None:
            for path in (folder / f"{name}.tmp", folder / name):
                path.unlink(missing_ok=True)
            log.append(f"undo {name}")

        return Staged(publish, undo)

    return stage


def test_group_sync_publishes_after_the_data_sync_and_fires_after_the_second(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailhost.ops import durable
    log: list = []
    monkeypatch.setattr(durable, "sync_filesystem", lambda path: log.append(f"sync {Path(path).name}"))
    runs = HeldRuns()
    group = durable.GroupSync(runs, tmp_path, batches=1)
    fired: list = []
    group.submit(staged_file(tmp_path, "a", log)).addCallback(lambda _: fired.append("a"))
    for name in "bc":  # arrive while the first batch is on its thread: they wait for the next batch
        group.submit(staged_file(tmp_path, name, log)).addCallback(lambda _, name=name: fired.append(name))
    assert len(runs.trips) == 1 and fired == []
    runs.finish()
    # No file under its final name before its data is durable; none acknowledged before its name is.
    assert log == ["write a", f"sync {tmp_path.name}", "publish a", f"sync {tmp_path.name}"] and fired == ["a"]
    assert len(runs.trips) == 1  # b and c together: one trip, one sync for each step
    log.clear()
    runs.finish()
    assert log == ["write b", "write c", f"sync {tmp_path.name}", "publish b", "publish c", f"sync {tmp_path.name}"]
    assert fired == ["a", "b", "c"] and (tmp_path / "c").read_text() == "queued"


def test_group_sync_a_failing_piece_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailhost.ops import durable
    monkeypatch.setattr(durable, "sync_filesystem", lambda path: None)
    runs = HeldRuns()
    group = durable.GroupSync(runs, tmp_path, batches=1)
    log: list = []
    group.submit(staged_file(tmp_path, "first", log))  # keeps the next three together in one batch
    outcomes: list = []

    def full_disk():
        raise OSError(28, "No space left on device")

    def unpublishable():
        staged = staged_file(tmp_path, "bad", log)()
        (tmp_path / "bad.tmp").unlink()  # its rename will fail
        return staged

    group.submit(full_disk).addErrback(lambda f: outcomes.append(f.value.strerror))
    group.submit(unpublishable).addErrback(lambda f: outcomes.append(type(f.value).__name__))
    group.submit(staged_file(tmp_path, "good", log)).addCallback(lambda _: outcomes.append("good"))
    runs.finish()
    runs.finish()
    assert outcomes == ["No space left on device", "FileNotFoundError", "good"]
    assert "undo bad" in log and (tmp_path / "good").exists()


def test_group_sync_a_failed_sync_acknowledges_none_and_undoes_every_piece(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mailhost.ops import durable
    syncs: list = []

    def failing_second(path):  # the data sync passes, the one after the renames fails
        syncs.append(path)
        if len(syncs) % 2 == 0:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable, "sync_filesystem", failing_second)
    runs = HeldRuns()
    group = durable.GroupSync(runs, tmp_path, batches=1)
    log: list = []
    failed: list = []
    for name in "xy":
        group.submit(staged_file(tmp_path, name, log)).addErrback(failed.append)
    for _ in range(2):
        runs.finish()
    # (the two went in two batches; either way every Deferred failed and every file is gone)
    assert len(failed) == 2 and {"undo x", "undo y"} <= set(log)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sync_filesystem_makes_a_rename_durable_without_error(tmp_path: Path) -> None:
    from mailhost.ops.durable import sync_filesystem, write_unsynced
    write_unsynced(str(tmp_path / "new"), [b"abc", b"def"])
    os.rename(tmp_path / "new", tmp_path / "placed")
    sync_filesystem(tmp_path)  # raises on a write-back error (Linux 5.8+)
    assert (tmp_path / "placed").read_bytes() == b"abcdef"


class ThreadReactor:
    """Enough reactor for a DiskWriter's pool: results are delivered on the pool's thread."""

    def callFromThread(self, function, *args, **kwargs):
        function(*args, **kwargs)


@pytest.mark.skipif(not batch_threads_possible(), reason="this kernel has no SCHED_BATCH for threads")
@pytest.mark.parametrize("background, policy", [(True, "SCHED_BATCH"), (False, "SCHED_OTHER")])
def test_a_background_writer_runs_its_work_on_threads_that_do_not_preempt_the_reactor(background: bool,
                                                                                       policy: str) -> None:
    """A background writer's threads are SCHED_BATCH (woken, they wait for the tick or a free core);
    an ordinary writer's (password checks) stay SCHED_OTHER; the reactor thread is never changed."""
    writer = DiskWriter(ThreadReactor(), threads=1, name="test-writer", background=background)  # type: ignore[arg-type]
    writer.start()
    seen: list = []
    done = threading.Event()
    try:
        writer.run(lambda: (os.sched_getscheduler(0), threading.current_thread().name)).addBoth(seen.append)
        writer.run(done.set)
        assert done.wait(10)
    finally:
        writer.stop()
    [(found, thread)] = seen
    assert found == getattr(os, policy) and thread.startswith("PoolThread-test-writer")
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
