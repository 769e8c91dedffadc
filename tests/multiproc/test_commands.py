"""mailhost.multiproc.commands: one AMP command set, answered alike by the control socket and a worker.

The CLI's blocking client (mailhost.doors.control.request/answer) talks to the control
socket's ControlProtocol; the main process's ShardedQueue hands the same commands to a
worker's WorkerChannel over the socket pair."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer

from mailhost.doors import control
from mailhost.multiproc.shard import Shard, shard_of
from mailhost.multiproc.child import WorkerChannel
from mailhost.multiproc.commands import PaceCommand, QueueCommand
from mailhost.multiproc.parent import ShardedQueue
from mailhost.queue.operations import apply_queue_action
from mailhost.queue.spool import SpoolError

ABC = "ABCDEFGHIJKLMNOP"  # queue ids have the shape new_queue_id gives
GONE = "GONEGONEGONEGONE"
PACES = {"example.test": {"rate": 10.0, "max_rate": 60.0, "connections": 2}}


class FakeQueue:
    """A queue that records what it was asked (a Scheduler's operations, without a spool)."""

    def __init__(self, flushed: int = 3) -> None:
        self.calls: list[tuple] = []
        self.flushed = flushed

    def flush(self, queue_id: str | None = None) -> int:
        self.calls.append(("flush", queue_id))
        return self.flushed if queue_id is None else 1

    def set_held(self, queue_id: str, held: bool):
        self.calls.append(("set_held", queue_id, held))
        return succeed(None)

    def delete(self, queue_id: str):
        self.calls.append(("delete", queue_id))
        if queue_id == GONE:
            return fail(SpoolError(f"{GONE}: no such message"))
        return succeed(None)


class FakePaces:
    def __init__(self, paces: dict) -> None:
        self.paces = paces

    def snapshot(self) -> dict:
        return self.paces


class FakePickup:
    collected = 0

    def collect(self) -> None:
        self.collected += 1


def ask_control_socket(protocol: amp.AMP, command: type[amp.Command], **arguments) -> dict:
    """What `mailhost queue ...` does over the socket: the CLI's request bytes in, its reading of the answer out."""
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(control.request(command, arguments))
    [reply] = amp.parseString(transport.value())
    return control.answer(command, reply)


def test_the_cli_request_is_answered_by_the_control_socket() -> None:
    queue, pickup = FakeQueue(), FakePickup()
    protocol = lambda: control.ControlProtocol(queue, pickup, FakePaces(PACES))  # noqa: E731
    assert ask_control_socket(protocol(), QueueCommand, action="flush", queue_id=None) == {"count": 3}
    assert ask_control_socket(protocol(), QueueCommand, action="hold", queue_id=ABC) == {"count": 1}
    assert ask_control_socket(protocol(), QueueCommand, action="delete", queue_id=ABC) == {"count": 1}
    assert queue.calls == [("flush", None), ("set_held", ABC, True), ("delete", ABC)]
    assert ask_control_socket(protocol(), QueueCommand, action="pickup") == {"count": 1}
    assert pickup.collected == 1
    assert json.loads(ask_control_socket(protocol(), PaceCommand)["json"]) == PACES


def test_a_refusal_reaches_the_cli_as_spool_error_with_its_text() -> None:
    protocol = control.ControlProtocol(FakeQueue(), FakePickup(), FakePaces({}))
    with pytest.raises(SpoolError, match=f"{GONE}: no such message"):
        ask_control_socket(protocol, QueueCommand, action="delete", queue_id=GONE)
    with pytest.raises(SpoolError, match="needs a queue id"):
        ask_control_socket(control.ControlProtocol(FakeQueue(), FakePickup(), FakePaces({})), QueueCommand,
                           action="hold")


@pytest.mark.parametrize("queue_id", ["../../../etc/passwd", "ABC", "A" * 5000, "abcdefghijklmnop", ""])
@pytest.mark.parametrize("action", ["flush", "delete", "hold", "release"])
def test_the_control_socket_refuses_what_is_not_a_queue_id(queue_id: str, action: str) -> None:
    # Anything that can connect to the socket: an id must never name a path outside the spool.
    queue = FakeQueue()
    with pytest.raises(SpoolError, match="is not a queue id"):
        ask_control_socket(control.ControlProtocol(queue, FakePickup(), FakePaces({})), QueueCommand,
                           action=action, queue_id=queue_id)
    assert queue.calls == []


def test_the_cli_reads_a_whole_box_from_its_socket() -> None:
    ours, theirs = socket.socketpair()
    try:
        box = amp.AmpBox({b"_answer": b"1", b"count": b"12"})
        theirs.sendall(box.serialize()[:5])  # in pieces, as a socket may hand it over
        theirs.sendall(box.serialize()[5:])
        assert control.answer(QueueCommand, control._read_box(ours)) == {"count": 12}
    finally:
        ours.close()
        theirs.close()


class FakeWorker:
    """The worker behind a WorkerChannel: its shard of the queue and its share of the paces."""

    def __init__(self) -> None:
        self.queue = FakeQueue(flushed=5)
        self.reactor = SimpleNamespace(running=False)
        self.number = 1

    async def queue_action(self, action: str, queue_id: str | None) -> int:
        return await apply_queue_action(self.queue, action, queue_id)

    def paces(self) -> dict:
        return {"example.test": {"rate": 5.0, "max_rate": 30.0, "connections": 1}}


def sharded_queue() -> tuple[ShardedQueue, FakeQueue, FakeWorker, object]:
    worker = FakeWorker()
    channel = amp.AMP()
    server = WorkerChannel(worker)
    pump = connect(server, makeFakeServer(server), channel, makeFakeClient(channel))
    pool = SimpleNamespace(workers={1: SimpleNamespace(channel=channel)})
    here = FakeQueue(flushed=2)
    return ShardedQueue(here, FakePaces(PACES), pool, lambda: Shard(0, 2)), here, worker, pump


def result_of(deferred, pump) -> object:
    # Listening before the answer comes, as the control socket does: AMP drops an error nobody waits for.
    found: list = []
    deferred.addBoth(found.append)
    pump.flush()
    assert found, "no answer"
    if hasattr(found[0], "raiseException"):
        found[0].raiseException()
    return found[0]


def test_the_main_process_hands_a_worker_the_control_socket_commands() -> None:
    queue, here, worker, pump = sharded_queue()
    theirs = Shard(1, 2).new_queue_id()
    ours = Shard(0, 2).new_queue_id()
    assert result_of(queue.delete(theirs), pump) == 1
    assert result_of(queue.set_held(ours, True), pump) is None
    assert worker.queue.calls == [("delete", theirs)] and here.calls == [("set_held", ours, True)]
    assert result_of(queue.flush(None), pump) == 2 + 5  # every process's count, added up
    paces = result_of(queue.snapshot(), pump)
    assert paces["example.test"]["rate"] == 15.0 and paces["example.test"]["max_rate"] == 90.0


def test_a_workers_refusal_reaches_the_main_process_as_spool_error() -> None:
    queue, here, worker, pump = sharded_queue()
    gone = "GONE"
    while shard_of(gone, 2) != 1:
        gone += "X"
    worker.queue.delete = lambda queue_id: fail(SpoolError(f"{queue_id}: no such message"))
    with pytest.raises(SpoolError, match="no such message"):
        result_of(queue.delete(gone), pump)
