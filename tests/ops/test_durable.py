"""mailhost.ops.durable: DiskWriter.run_together shares one thread trip among the calls of one reactor turn;
write_and_sync writes every chunk whole, short writes included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from mailhost.ops.durable import DiskWriter, write_and_sync


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


def test_group_sync_fires_each_only_after_its_batch_is_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailhost.ops import durable
    synced: list = []
    monkeypatch.setattr(durable, "sync_filesystem", lambda path: synced.append(path))
    runs = HeldRuns()
    group = durable.GroupSync(runs, tmp_path, batches=1)
    fired: list = []
    written: list = []
    group.submit(lambda: written.append("a") or "a", lambda: None).addCallback(fired.append)
    for name in "bc":  # arrive while the first batch is on its thread: they wait for the next batch
        group.submit(lambda name=name: written.append(name) or name, lambda: None).addCallback(fired.append)
    assert len(runs.trips) == 1 and fired == []
    runs.finish()
    assert written == ["a"] and synced == [tmp_path] and fired == ["a"]
    assert len(runs.trips) == 1  # b and c together: one trip, one sync
    runs.finish()
    assert written == ["a", "b", "c"] and synced == [tmp_path, tmp_path] and fired == ["a", "b", "c"]


def test_group_sync_a_failing_piece_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailhost.ops import durable
    monkeypatch.setattr(durable, "sync_filesystem", lambda path: None)
    runs = HeldRuns()
    group = durable.GroupSync(runs, tmp_path, batches=1)
    group.submit(lambda: "first", lambda: None)  # keeps the next two together in one batch
    outcomes: list = []

    def bad() -> None:
        raise OSError(28, "No space left on device")

    group.submit(bad, lambda: None).addErrback(lambda f: outcomes.append(f.value.strerror))
    group.submit(lambda: "good", lambda: None).addCallback(outcomes.append)
    runs.finish()
    runs.finish()
    assert outcomes == ["No space left on device", "good"]


def test_group_sync_a_failed_sync_acknowledges_none_and_undoes_every_piece(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mailhost.ops import durable

    def failing(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable, "sync_filesystem", failing)
    runs = HeldRuns()
    group = durable.GroupSync(runs, tmp_path)
    undone: list = []
    failed: list = []
    for name in "xy":
        path = tmp_path / name
        group.submit(lambda path=path: path.write_text("queued"),
                     lambda path=path: (path.unlink(), undone.append(path.name))).addErrback(failed.append)
    for _ in range(len(runs.trips)):
        runs.finish()
    # (the two went in two batches or one; either way every Deferred failed and every file is gone)
    assert len(failed) == 2 and sorted(undone) == ["x", "y"] and not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_sync_filesystem_makes_a_rename_durable_without_error(tmp_path: Path) -> None:
    from mailhost.ops.durable import sync_filesystem, write_unsynced
    write_unsynced(str(tmp_path / "new"), [b"abc", b"def"])
    os.rename(tmp_path / "new", tmp_path / "placed")
    sync_filesystem(tmp_path)  # raises on a write-back error (Linux 5.8+)
    assert (tmp_path / "placed").read_bytes() == b"abcdef"
