"""mailhost.smtp.transport.EagerServer: a write goes out at once when nothing waits, else in order behind it."""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol

from mailhost.smtp.transport import EagerClient, EagerServer, make_eager, send_eagerly


class FakeReactor:
    """Just enough of a reactor for a tcp.Server: which descriptors wait to read or write."""

    def __init__(self) -> None:
        self.readers: set = set()
        self.writers: set = set()

    def addReader(self, reader) -> None:
        self.readers.add(reader)

    def removeReader(self, reader) -> None:
        self.readers.discard(reader)

    def addWriter(self, writer) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer) -> None:
        self.writers.discard(writer)


def connection() -> tuple[EagerServer, socket.socket, FakeReactor]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    reactor = FakeReactor()
    server = EagerServer(ours, Protocol(), ("127.0.0.1", 2525), None, 1, reactor)
    return server, peer, reactor


def read_all(peer: socket.socket) -> bytes:
    peer.setblocking(False)
    data = b""
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_a_reply_is_sent_at_once_without_waiting_for_writability() -> None:
    server, peer, reactor = connection()
    server.write(b"250 2.0.0 Ok\r\n")
    assert peer.recv(100) == b"250 2.0.0 Ok\r\n"
    assert server not in reactor.writers


def test_what_does_not_fit_waits_and_later_writes_queue_behind_it() -> None:
    server, peer, reactor = connection()
    big = bytes(range(256)) * 40000  # more than the socket buffers hold
    server.write(big)
    server.write(b"tail")
    assert server in reactor.writers
    received = b""
    while server in reactor.writers:
        received += read_all(peer)
        server.doWrite()
    received += read_all(peer)
    assert received == big + b"tail"


def test_tls_and_lost_connections_take_the_usual_path() -> None:
    server, peer, reactor = connection()
    server.TLS = True  # writes go through the TLS layer, never straight to the socket
    server.connected = False
    server.write(b"dropped")
    assert read_all(peer) == b""
    server, peer, reactor = connection()
    server.loseConnection()
    server.write(b"late")
    assert read_all(peer) == b""


def test_only_plain_tcp_ports_are_switched() -> None:
    port = tcp.Port(0, None)
    send_eagerly(port)
    assert port.transport is EagerServer
    send_eagerly(object())  # a UNIX port, or anything else: left alone


def test_an_outbound_connection_is_made_eager_once_connected() -> None:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    reactor = FakeReactor()
    client = tcp.Client.__new__(tcp.Client)  # as the connector builds it, without connecting anywhere
    tcp.Connection.__init__(client, ours, Protocol(), reactor)
    client.connected = True
    make_eager(client)
    assert isinstance(client, EagerClient)
    client.write(b"MAIL FROM:<a@example.test>\r\n")
    assert peer.recv(100) == b"MAIL FROM:<a@example.test>\r\n"
    assert client not in reactor.writers


def test_other_transports_are_left_alone() -> None:
    class Wrapped:
        pass

    wrapped = Wrapped()
    make_eager(wrapped)
    assert type(wrapped) is Wrapped
