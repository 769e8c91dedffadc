"""mailhost.multiproc.accept: on a listening socket the processes share, one connection per
wake-up (so a burst spreads over them), left a moment to a process with fewer sessions open,
handed to the reactor; the port keeps the socket."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
from twisted.internet import tcp, unix
from twisted.internet.protocol import Factory, Protocol

from mailhost.multiproc.accept import PAUSE_SECONDS, YIELD_SECONDS, balance
from mailhost.multiproc.loads import SessionLoads
from tests.test_service import ReadingReactor as Reactor  # real ports, the readers registered


def tcp_port(reactor: Reactor) -> tcp.Port:
    port = tcp.Port(0, Factory.forProtocol(Protocol), interface="127.0.0.1", reactor=reactor)
    port.startListening()
    return port


def connect(port: tcp.Port) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)


@pytest.fixture
def loads():
    """Two processes' session counts: we are the main process (slot 0); the worker (slot 1) is not accepting."""
    made = SessionLoads.create(2)
    yield made
    made.close()


def sessions_of(reactor: Reactor):
    """Our count of open sessions: one per connection the reactor was handed."""
    return lambda: len(reactor.adoptedStreamConnections)


def test_one_connection_per_wake_up_the_rest_left_to_the_others(loads: SessionLoads) -> None:
    reactor = Reactor()
    port = tcp_port(reactor)
    assert port in reactor.reading
    accepts = balance(port, port.factory, reactor, loads, sessions_of(reactor))
    assert port not in reactor.reading and accepts in reactor.reading  # we accept now, not Twisted's port
    clients = [connect(port) for _ in range(3)]
    for taken in (1, 2, 3):
        accepts.doRead()
        assert len(reactor.adoptedStreamConnections) == taken
    accepts.doRead()  # nothing pending (another process took it): nothing happens
    assert len(reactor.adoptedStreamConnections) == 3
    assert {family for _, family, _ in reactor.adoptedStreamConnections} == {socket.AF_INET}

    accepts.stop()
    assert accepts not in reactor.reading and accepts.fileno() == -1
    with connect(port):  # the port still listens: stopping our copy left its socket alone
        pass
    port.stopListening()
    reactor.advance(0)
    for client in clients:
        client.close()


def test_with_more_sessions_than_another_process_it_leaves_it_the_connection_a_moment(
        loads: SessionLoads) -> None:
    """The worker has none open, we have one: the next connection is the worker's to take (it
    woke for it too). Nobody took it within YIELD_SECONDS: we do, at our next wake-up."""
    reactor = Reactor()
    port = tcp_port(reactor)
    accepts = balance(port, port.factory, reactor, loads, sessions_of(reactor))
    worker = SessionLoads.attach(loads.fileno(), 2, 1)  # what the worker process maps
    worker.publish(0)
    clients = [connect(port) for _ in range(2)]
    accepts.doRead()  # one each: we take the first
    assert len(reactor.adoptedStreamConnections) == 1
    assert loads.fewest_elsewhere() == 0 and worker.fewest_elsewhere() == 1  # published: the worker sees ours
    accepts.doRead()
    assert len(reactor.adoptedStreamConnections) == 1 and accepts not in reactor.reading  # left to the worker
    reactor.advance(YIELD_SECONDS)
    assert accepts in reactor.reading
    accepts.doRead()  # still waiting: the worker is busy or stopped, so we take it
    assert len(reactor.adoptedStreamConnections) == 2
    accepts.stop()
    port.stopListening()
    reactor.advance(0)
    for client in clients:
        client.close()


def test_a_connection_another_process_took_meanwhile_is_not_waited_for(loads: SessionLoads) -> None:
    reactor = Reactor()
    port = tcp_port(reactor)
    accepts = balance(port, port.factory, reactor, loads, lambda: 3)
    worker = SessionLoads.attach(loads.fileno(), 2, 1)
    worker.publish(1)
    with connect(port):
        accepts.doRead()
        assert accepts not in reactor.reading and not reactor.adoptedStreamConnections
        taken, _ = port.socket.accept()  # the worker takes it
        taken.close()
        reactor.advance(YIELD_SECONDS)
        assert accepts in reactor.reading
        with connect(port):  # the next one finds us at 3 against 1 again: left to the worker again
            accepts.doRead()
            assert accepts not in reactor.reading and not reactor.adoptedStreamConnections
            reactor.advance(YIELD_SECONDS)
    accepts.stop()
    port.stopListening()
    reactor.advance(0)


@pytest.mark.parametrize("ours, worker", [(0, 0), (2, 2), (1, 3)])
def test_with_no_more_sessions_than_the_others_a_connection_costs_no_pause(loads: SessionLoads, ours: int,
                                                                            worker: int) -> None:
    reactor = Reactor()
    port = tcp_port(reactor)
    accepts = balance(port, port.factory, reactor, loads, lambda: ours)
    SessionLoads.attach(loads.fileno(), 2, 1).publish(worker)
    with connect(port):
        accepts.doRead()
        assert len(reactor.adoptedStreamConnections) == 1 and accepts in reactor.reading
    accepts.stop()
    port.stopListening()
    reactor.advance(0)


def test_a_worker_that_ended_is_not_waited_for(loads: SessionLoads) -> None:
    reactor = Reactor()
    port = tcp_port(reactor)
    accepts = balance(port, port.factory, reactor, loads, lambda: 5)
    SessionLoads.attach(loads.fileno(), 2, 1).publish(0)
    loads.mark_absent(1)  # the main process saw it end
    with connect(port):
        accepts.doRead()
        assert len(reactor.adoptedStreamConnections) == 1
    accepts.stop()
    port.stopListening()
    reactor.advance(0)


def test_a_unix_listener_too(tmp_path: Path, loads: SessionLoads) -> None:
    reactor = Reactor()
    path = str(tmp_path / "smtp.sock")
    port = unix.Port(path, Factory.forProtocol(Protocol), reactor=reactor)
    port.startListening()
    accepts = balance(port, port.factory, reactor, loads, sessions_of(reactor))
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
        accepts.doRead()
    assert [family for _, family, _ in reactor.adoptedStreamConnections] == [socket.AF_UNIX]
    accepts.stop()
    port.stopListening()
    reactor.advance(0)


class _NoDescriptors:
    """A listening socket whose accept() meets a full descriptor table."""

    def accept(self):
        raise OSError(errno.EMFILE, "Too many open files")

    def close(self) -> None:
        pass


def test_out_of_descriptors_it_pauses_and_comes_back(monkeypatch: pytest.MonkeyPatch, loads: SessionLoads) -> None:
    reactor = Reactor()
    port = tcp_port(reactor)
    accepts = balance(port, port.factory, reactor, loads, sessions_of(reactor))
    real = accepts._socket
    monkeypatch.setattr(accepts, "_socket", _NoDescriptors())
    accepts.doRead()  # not a busy loop on a socket that stays readable: it stops reading a while
    assert accepts not in reactor.reading
    monkeypatch.setattr(accepts, "_socket", real)
    reactor.advance(PAUSE_SECONDS)
    assert accepts in reactor.reading
    accepts.stop()
    port.stopListening()
    reactor.advance(0)



class GoneClients(Reactor):
    """Every connection it is handed is already reset by its client, or its session fails to start."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def adoptStreamConnection(self, fileDescriptor, addressFamily, factory):
        raise self.error


@pytest.mark.parametrize("error", [OSError(errno.ENOTCONN, "Transport endpoint is not connected"),
                                   RuntimeError("a session that cannot start")])
def test_a_connection_that_fails_to_start_does_not_stop_the_accepting(error: Exception, loads: SessionLoads) -> None:
    reactor = GoneClients(error)
    port = tcp_port(reactor)
    accepts = balance(port, port.factory, reactor, loads, sessions_of(reactor))
    clients = [connect(port) for _ in range(2)]
    accepts.doRead()  # raising out of doRead would make the real reactor drop the reader
    accepts.doRead()
    assert accepts in reactor.reading
    with pytest.raises(BlockingIOError):  # both were taken off the queue
        port.socket.accept()
    accepts.stop()
    port.stopListening()
    reactor.advance(0)
    for client in clients:
        client.close()
