"""Whether this kernel lets a thread make itself SCHED_BATCH (Linux does; gVisor, for one, knows
only SCHED_OTHER, and mailhost's disk threads then stay ordinary threads, as designed)."""

from __future__ import annotations

import os
import threading


def batch_threads_possible() -> bool:
    """Asked of a throwaway thread, so the caller's own policy is never changed."""
    if not hasattr(os, "SCHED_BATCH"):
        return False
    found: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            found.append(os.sched_getscheduler(0) == os.SCHED_BATCH)
        except OSError:
            found.append(False)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return found == [True]
