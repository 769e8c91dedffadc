"""mailhost.service.ListenerService: binds before twistd drops privileges, holds the port the
workers share, says in one line when it cannot bind, and lets go of the port at stop."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from twisted.internet import error, tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor
from twisted.logger import globalLogPublisher

from mailhost.multiproc.loads import SessionLoads
from mailhost.service import ListenerService


@contextmanager
def capture_log() -> Iterator[list[dict]]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


class BindingReactor(MemoryReactorClock):
    """Binds real TCP ports (nothing is accepted: no reactor runs) and counts the listen calls."""

    def __init__(self) -> None:
        super().__init__()
        self.bound = 0

    def addReader(self, reader) -> None:
        pass

    def removeReader(self, reader) -> None:
        pass

    def listenTCP(self, port, factory, backlog=50, interface=""):
        self.bound += 1
        listening = tcp.Port(port, factory, backlog, interface, reactor=self)
        listening.startListening()
        return listening


def refused(address: tuple[str, int]) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(address) != 0


def test_the_port_is_bound_before_the_daemon_starts_and_held_until_it_stops() -> None:
    reactor = BindingReactor()
    listener = ListenerService("tcp:0:interface=127.0.0.1", Factory.forProtocol(Protocol), reactor)
    assert listener.port() is None
    listener.privilegedStartService()  # as root, before twistd's --uid
    port = listener.port()
    address = ("127.0.0.1", port.getHost().port)
    assert isinstance(port, tcp.Port) and port.fileno() >= 0 and not refused(address)
    listener.startService()  # after the switch: bound already, not again
    assert reactor.bound == 1 and listener.port() is port
    stopped = listener.stopService()
    reactor.advance(0)
    assert stopped.called and listener.port() is None and refused(address)


class ReadingReactor(BindingReactor):
    """Also keeps the readers registered."""

    def __init__(self) -> None:
        super().__init__()
        self.reading: set = set()

    def addReader(self, reader) -> None:
        self.reading.add(reader)

    def removeReader(self, reader) -> None:
        self.reading.discard(reader)


def test_a_listener_shared_with_workers_accepts_one_connection_per_wake_up() -> None:
    reactor = ReadingReactor()
    loads = SessionLoads.create(2)
    listener = ListenerService("tcp:0:interface=127.0.0.1", Factory.forProtocol(Protocol), reactor,
                               balanced=(loads, lambda: 0))
    listener.privilegedStartService()
    port = listener.port()
    # Twisted's port keeps the socket but no longer reads it (it would take a whole burst):
    # mailhost.multiproc.accept's reader does, on a copy of the descriptor.
    [reader] = reactor.reading
    assert reader is not port and reader.fileno() not in (-1, port.fileno())
    listener.startService()
    stopped = listener.stopService()
    reactor.advance(0)
    assert stopped.called and not reactor.reading and reader.fileno() == -1
    loads.close()


def test_started_without_privileges_it_binds_then() -> None:
    reactor = BindingReactor()
    listener = ListenerService("tcp:0:interface=127.0.0.1", Factory.forProtocol(Protocol), reactor)
    listener.startService()
    assert reactor.bound == 1 and isinstance(listener.port(), tcp.Port)
    listener.stopService()
    reactor.advance(0)


def test_a_port_in_use_stops_the_daemon_with_one_line(capsys) -> None:
    from twisted.internet import reactor  # the real one: listenTCP fails at once, nothing is left registered

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        number = taken.getsockname()[1]
        listener = ListenerService(f"tcp:{number}:interface=127.0.0.1", Factory.forProtocol(Protocol), reactor)
        with pytest.raises(SystemExit) as stop:
            listener.privilegedStartService()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mailhost: cannot listen on tcp:{number}:interface=127.0.0.1: ") and err.count("\n") == 1
    assert "Traceback" not in err and listener.port() is None


def test_other_errors_are_not_hidden() -> None:
    reactor = RaisingMemoryReactor(listenException=RuntimeError("something else"))
    listener = ListenerService("tcp:0", Factory.forProtocol(Protocol), reactor)
    with pytest.raises(RuntimeError, match="something else"):
        listener.privilegedStartService()


class LaterEndpoint:
    """An endpoint whose listen() answers later (none of mailhost's kinds do, but the interface allows it)."""

    def __init__(self) -> None:
        self.waiting: Deferred = Deferred()

    def listen(self, factory) -> Deferred:
        return self.waiting


def test_an_endpoint_that_binds_later_gives_its_port_then_or_is_cancelled_at_stop() -> None:
    listener = ListenerService("tcp:0", Factory.forProtocol(Protocol), MemoryReactorClock())
    listener.endpoint = LaterEndpoint()
    listener.privilegedStartService()
    assert listener.port() is None
    port = object()
    listener.endpoint.waiting.callback(port)
    assert listener.port() is port

    listener = ListenerService("tcp:0", Factory.forProtocol(Protocol), MemoryReactorClock())
    listener.endpoint = endpoint = LaterEndpoint()
    listener.privilegedStartService()
    with capture_log() as events:
        listener.stopService()
    assert endpoint.waiting.called and listener.port() is None and events == []  # cancelled, quietly


def test_an_endpoint_that_fails_later_says_so_in_the_log() -> None:
    listener = ListenerService("tcp:0", Factory.forProtocol(Protocol), MemoryReactorClock())
    listener.endpoint = endpoint = LaterEndpoint()
    listener.privilegedStartService()
    with capture_log() as events:
        endpoint.waiting.errback(error.CannotListenError("", 0, OSError("no such socket")))
    assert [e["log_format"] for e in events] == ["cannot listen on {endpoint}"] and listener.port() is None
