"""mailhost.durable.DiskWriter.run_together: the calls of one reactor turn share one thread trip."""

from __future__ import annotations

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from mailhost.durable import DiskWriter


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
