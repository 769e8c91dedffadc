"""mailhost.multiproc.shard: which process of `[server] workers = N` delivers a queued message."""

from __future__ import annotations

from collections import Counter

import pytest

from mailhost.multiproc.shard import EVERYTHING, Shard, shard_of
from mailhost.queue.spool import is_queue_id, new_queue_id


def test_alone_a_process_owns_every_id() -> None:
    assert all(EVERYTHING.owns(new_queue_id()) for _ in range(50))
    assert all(EVERYTHING.owns(EVERYTHING.new_queue_id()) for _ in range(50))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_new_ids_are_of_the_process_own_shard(index: int) -> None:
    shard = Shard(index, 3)
    ids = [shard.new_queue_id() for _ in range(200)]
    assert all(is_queue_id(i) and shard_of(i, 3) == index and shard.owns(i) for i in ids)
    assert not any(Shard((index + 1) % 3, 3).owns(i) for i in ids)
    assert len(set(ids)) == 200


def test_random_ids_spread_evenly_over_the_shards() -> None:
    counts = Counter(shard_of(new_queue_id(), 2) for _ in range(4000))
    assert set(counts) == {0, 1} and abs(counts[0] - counts[1]) < 400


@pytest.mark.parametrize("index, count", [(2, 2), (-1, 2), (0, 0)])
def test_a_shard_outside_the_count_is_refused(index: int, count: int) -> None:
    with pytest.raises(ValueError):
        Shard(index, count)
