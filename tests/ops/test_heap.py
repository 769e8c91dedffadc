"""The daemon's collector settings (mailhost.ops.heap) keep reclaiming cycles. Each check runs
in a fresh interpreter: the settings are process-wide and would change every later test."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_cycles_made_after_the_heap_is_settled_are_still_reclaimed():
    out = run("""
        import gc, weakref
        from mailhost.ops.heap import YOUNG_COLLECTION_EVERY, collect_less_often, settle_heap

        class Node:
            pass

        collect_less_often()
        kept = [Node() for _ in range(1000)]  # what lives for the daemon's life
        settle_heap()
        alive = weakref.WeakSet()
        most = 0
        for _ in range(200_000):  # a drain's worth of dropped cycles (a Failure and its frames, say)
            a, b = Node(), Node()
            a.other, b.other = b, a
            alive.add(a)
            most = max(most, len(alive))
        print(gc.get_threshold()[0] == YOUNG_COLLECTION_EVERY, gc.get_freeze_count() >= 1000, most < 50_000, len(kept))
    """)
    assert out == "True True True 1000"
