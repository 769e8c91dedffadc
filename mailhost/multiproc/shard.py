"""Which process of a daemon with `[server] workers = N` delivers a queued message.

Each of the N processes (the main one is shard 0, worker k is shard k) runs its
own queue over the messages whose id hashes to it, so delivery uses every core
the way intake does. A process gives the messages it accepts ids of its own
shard, so it delivers them itself with no hand-over; each loads its own shard
from the spool when it starts (again, after a restart).
"""

from __future__ import annotations

import zlib

from mailhost.queue import spool

_index = 0
_count = 1


def claim(index: int, count: int) -> None:
    """This process is shard `index` of `count` (0 of 1: it delivers everything)."""
    global _index, _count
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count}")
    _index, _count = index, count


def count() -> int:
    return _count


def index() -> int:
    return _index


def shard_of(queue_id: str, shards: int) -> int:
    return zlib.crc32(queue_id.encode("ascii", "replace")) % shards if shards > 1 else 0


def owns(queue_id: str) -> bool:
    return _count == 1 or shard_of(queue_id, _count) == _index


def new_queue_id() -> str:
    """A fresh queue id (spool.new_queue_id) in this process's shard: N tries on average."""
    while True:
        queue_id = spool.new_queue_id()
        if owns(queue_id):
            return queue_id
