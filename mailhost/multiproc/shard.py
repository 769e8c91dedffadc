"""Which process of a daemon with `[server] workers = N` delivers a queued message.

Each of the N processes (the main one is shard 0, worker k is shard k) runs its
own queue over the messages whose id hashes to it, so delivery uses every core
the way intake does. A process gives the messages it accepts ids of its own
shard, so it delivers them itself with no hand-over; each loads its own shard
from the spool when it starts (again, after a restart).

A process's Shard is a value handed to the intake and the scheduler that need it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from mailhost.queue.spool import new_queue_id as any_queue_id


def shard_of(queue_id: str, shards: int) -> int:
    return zlib.crc32(queue_id.encode("ascii", "replace")) % shards if shards > 1 else 0


@dataclass(frozen=True)
class Shard:
    """This process is shard `index` of `count` (0 of 1: it delivers everything)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count}")

    def owns(self, queue_id: str) -> bool:
        return self.count == 1 or shard_of(queue_id, self.count) == self.index

    def new_queue_id(self) -> str:
        """A fresh queue id in this shard: `count` tries on average."""
        while True:
            queue_id = any_queue_id()
            if self.owns(queue_id):
                return queue_id


EVERYTHING = Shard(0, 1)
