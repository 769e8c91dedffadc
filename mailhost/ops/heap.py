"""The cyclic garbage collector, set for a daemon.

Delivering a message makes and drops thousands of objects (Deferreds, replies, envelopes),
nearly all freed by reference counting the moment they are done. With CPython's default
thresholds (700, 10, 10) the collector still ran every few messages, and about every
hundredth young collection was a full one, walking the whole heap again: modules, the
configuration, the queue's index, which live as long as the process (about 5% of a queue
drain's CPU, measured with gc.callbacks and perf).
"""

from __future__ import annotations

import gc

# Net allocations of container objects between two young collections (CPython: 700).
# Cycles made meanwhile are still found, only in fewer, larger collections.
YOUNG_COLLECTION_EVERY = 10_000


def collect_less_often() -> None:
    """Young collections every YOUNG_COLLECTION_EVERY allocations; the older generations
    as CPython does it (every 10 of the one below)."""
    gc.set_threshold(YOUNG_COLLECTION_EVERY, 10, 10)


def settle_heap() -> None:
    """Once the daemon has started (modules imported, the queue loaded): keep what is
    alive now out of later collections (gc.freeze). They still walk everything made
    afterwards, and reference counting still frees these objects when they go."""
    gc.freeze()
