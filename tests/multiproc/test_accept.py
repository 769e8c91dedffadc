"""mailhost.multiproc.accept: on a listening socket the processes share, one connection per
wake-up (so a burst spreads over them), handed to the reactor; the port keeps the socket."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
from twisted.internet import tcp, unix
from twisted.internet.protocol import Factory, Protocol

from mailhost.multiproc.accept import PAUSE_SECONDS, SHARE_PAUSE_SECONDS, balance
from tests.test_service import ReadingReactor as Reactor  # real ports, the readers registered


def tcp_port(reactor: Reactor) -> tcp.Port:
    port = tcp.Port(0, Factory.forProtocol(Protocol), interface="127.0.0.1", reactor=reactor)
    port.startListening()
    return port


def connect(port: tcp.Port) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)


def test_one_connection_per_wake_up_the_rest_left_to_the_others() -> None:
    reactor = Reactor()
    port = tcp_port(reactor)
    assert port in reactor.reading
    accepts = balance(port, port.factory, reactor)
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


def test_after_each_connection_it_leaves_the_next_to_the_others_a_moment() -> None:
    """With more connections waiting (a burst), the process whose reactor comes round first would
    otherwise take the next one too (6 of 10 in most runs of bench/campaign.py): it sits out a
    millisecond, then comes back."""
    reactor = Reactor()
    port = tcp_port(reactor)
    accepts = balance(port, port.factory, reactor)
    clients = [connect(port) for _ in range(2)]
    accepts.doRead()
    assert len(reactor.adoptedStreamConnections) == 1
    assert accepts not in reactor.reading  # the second is left for another process meanwhile
    reactor.advance(SHARE_PAUSE_SECONDS)
    assert accepts in reactor.reading  # nobody took it: this process does, at its next wake-up
    accepts.doRead()
    assert len(reactor.adoptedStreamConnections) == 2
    accepts.doRead()  # nothing pending: no pause either
    reactor.advance(SHARE_PAUSE_SECONDS)
    assert accepts in reactor.reading
    accepts.stop()
    assert accepts not in reactor.reading
    port.stopListening()
    reactor.advance(0)
    for client in clients:
        client.close()


def test_a_connection_alone_costs_no_pause() -> None:
    """Mail that comes a connection at a time (no burst waiting behind it) is not slowed down."""
    reactor = Reactor()
    port = tcp_port(reactor)
    accepts = balance(port, port.factory, reactor)
    with connect(port):
        accepts.doRead()
        assert len(reactor.adoptedStreamConnections) == 1
        assert accepts in reactor.reading
    accepts.stop()
    port.stopListening()
    reactor.advance(0)


def test_a_unix_listener_too(tmp_path: Path) -> None:
    reactor = Reactor()
    path = str(tmp_path / "smtp.sock")
    port = unix.Port(path, Factory.forProtocol(Protocol), reactor=reactor)
    port.startListening()
    accepts = balance(port, port.factory, reactor)
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


def test_out_of_descriptors_it_pauses_and_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    reactor = Reactor()
    port = tcp_port(reactor)
    accepts = balance(port, port.factory, reactor)
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
def test_a_connection_that_fails_to_start_does_not_stop_the_accepting(error: Exception) -> None:
    reactor = GoneClients(error)
    port = tcp_port(reactor)
    accepts = balance(port, port.factory, reactor)
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
