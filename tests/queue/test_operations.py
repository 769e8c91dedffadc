"""mailhost.queue.operations: the one interface the control socket and the workers steer a queue through."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, succeed

from mailhost.delivery.scheduler import Scheduler
from mailhost.delivery.throttle import Throttle
from mailhost.multiproc.parent import ShardedQueue
from mailhost.queue import operations
from mailhost.queue.operations import PaceReport, QueueOperations, apply_queue_action
from mailhost.queue.spool import SpoolError


def test_the_scheduler_and_the_sharded_queue_provide_the_operations() -> None:
    for implementation in (Scheduler, ShardedQueue):
        assert isinstance(implementation.__new__(implementation), QueueOperations), implementation
    for implementation in (Throttle, ShardedQueue):
        assert isinstance(implementation.__new__(implementation), PaceReport), implementation


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def flush(self, queue_id: str | None = None) -> int:
        self.calls.append(("flush", queue_id))
        return 4

    def set_held(self, queue_id: str, held: bool) -> Deferred[None]:
        self.calls.append(("set_held", queue_id, held))
        return succeed(None)

    def delete(self, queue_id: str) -> Deferred[None]:
        self.calls.append(("delete", queue_id))
        return succeed(None)


def run(action: str, queue_id: str | None, queue: Recorder) -> int:
    found: list = []
    Deferred.fromCoroutine(apply_queue_action(queue, action, queue_id)).addBoth(found.append)
    if hasattr(found[0], "raiseException"):
        found[0].raiseException()
    return found[0]


@pytest.mark.parametrize("action, queue_id, count, call", [
    ("flush", None, 4, ("flush", None)),
    ("flush", "Q1", 4, ("flush", "Q1")),
    ("hold", "Q1", 1, ("set_held", "Q1", True)),
    ("release", "Q1", 1, ("set_held", "Q1", False)),
    ("delete", "Q1", 1, ("delete", "Q1")),
])
def test_each_action_calls_its_operation(action: str, queue_id: str | None, count: int, call: tuple) -> None:
    queue = Recorder()
    assert run(action, queue_id, queue) == count
    assert queue.calls == [call]


@pytest.mark.parametrize("action, queue_id, message", [
    ("hold", None, "hold needs a queue id"),
    ("delete", None, "delete needs a queue id"),
    ("bounce", "Q1", "unknown action bounce"),
])
def test_a_wrong_request_is_a_spool_error(action: str, queue_id: str | None, message: str) -> None:
    queue = Recorder()
    with pytest.raises(SpoolError, match=message):
        run(action, queue_id, queue)
    assert queue.calls == []


def test_the_interface_imports_nothing_above_the_queue() -> None:
    tree = ast.parse(Path(operations.__file__).read_text())
    ours = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module and node.module.startswith("mailhost")}
    ours |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
             if alias.name.startswith("mailhost")}
    assert all(name.startswith("mailhost.queue") for name in ours), ours
