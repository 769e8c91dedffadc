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
