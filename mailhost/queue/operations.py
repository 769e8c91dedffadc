"""What an operator does to a running daemon's queue, as one interface.

`mailhost queue flush|delete|hold|release` reaches the daemon over the control
socket (mailhost.doors.control), and with `[server] workers = N` the main process
hands it on to the process holding the message (mailhost.multiproc). Whoever
answers does it through QueueOperations, implemented by:

- mailhost.delivery.scheduler.Scheduler: one process's queue (all of it, or its shard);
- mailhost.multiproc.parent.ShardedQueue: the main process's view when every process
  delivers its own shard; it passes each operation to the process that holds the message.

The paces `mailhost queue list` shows come through PaceReport, implemented by
mailhost.delivery.throttle.Throttle and by ShardedQueue (every process's, added up).

Either may answer at once or with a Deferred.
This module sits below delivery/ and the doors: it imports nothing above queue/.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from twisted.internet.defer import Deferred

from mailhost.queue.spool import SpoolError

# Destination group -> {"rate", "max_rate", "connections"} (mailhost.delivery.throttle.Throttle.snapshot).
Paces = dict[str, dict[str, float]]

@runtime_checkable
class QueueOperations(Protocol):
    def flush(self, queue_id: str | None = None) -> int | Deferred[int]:
        """Make one message (None: every message not held) due now; how many."""
        ...

    def set_held(self, queue_id: str, held: bool) -> Deferred[Any]:
        """Hold a message (no delivery attempts until released) or release it.
        Fails with SpoolError when there is no such message."""
        ...

    def delete(self, queue_id: str) -> Deferred[Any]:
        """Remove a message from the queue and the spool, unsent.
        Fails with SpoolError when there is no such message."""
        ...


@runtime_checkable
class PaceReport(Protocol):
    def snapshot(self) -> Paces | Deferred[Paces]:
        """Each paced destination group's current and configured rate."""
        ...


async def apply_queue_action(queue: QueueOperations, action: str, queue_id: str | None) -> int:
    """flush, delete, hold or release on `queue`; how many messages it touched.
    The control socket runs it on the daemon's queue, a worker on its shard's."""
    if action == "flush":
        flushed = queue.flush(queue_id)
        return flushed if isinstance(flushed, int) else await flushed
    if queue_id is None:
        raise SpoolError(f"{action} needs a queue id")
    if action == "delete":
        await queue.delete(queue_id)
    elif action in ("hold", "release"):
        await queue.set_held(queue_id, action == "hold")
    else:
        raise SpoolError(f"unknown action {action}")
    return 1
