"""mailhost.smtp.transport: a write goes out at once when nothing waits, else in order behind it;
and the eager transports deliver what Twisted's own (the plain reference) deliver."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol

from mailhost.smtp import transport
from mailhost.smtp.transport import EagerClient, EagerServer, make_eager, send_eagerly, server_class


@contextmanager
def transports(plain: bool) -> Iterator[None]:
    """Eager or plain transports inside the block, whatever MAILHOST_PLAIN_TCP says."""
    before = transport.plain_transport()
    transport.use_plain_transport(plain)
    try:
        yield
    finally:
        transport.use_plain_transport(before)


@pytest.fixture(autouse=True)
def eager():
    with transports(plain=False):
        yield


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


def test_the_twisted_internals_the_eager_transport_reads_are_there() -> None:
    # Should a Twisted upgrade change them, the daemon falls back to the plain transport by itself;
    # this test says so, so that transport.py is looked at again.
    assert transport.internals_present()


def test_the_plain_transport_leaves_twisteds_classes_alone() -> None:
    with transports(plain=True):
        port = tcp.Port(0, None)
        send_eagerly(port, before_write=lambda: None)
        assert port.transport is tcp.Server
        client = tcp.Client.__new__(tcp.Client)
        make_eager(client)
        assert type(client) is tcp.Client


def test_mailhost_plain_tcp_in_the_environment_chooses_the_plain_transport() -> None:
    code = "from mailhost.smtp import transport; print(transport.plain_transport())"
    for value, plain in (("1", "True"), ("0", "False"), ("", "False")):
        env = dict(os.environ, MAILHOST_PLAIN_TCP=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == plain, value


def test_the_hook_runs_before_each_server_write_and_is_kept_per_hook() -> None:
    calls: list[int] = []
    hook = lambda: calls.append(len(calls))  # noqa: E731
    assert server_class(hook) is server_class(hook) and issubclass(server_class(hook), EagerServer)
    assert server_class(None) is EagerServer
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    server = server_class(hook)(ours, Protocol(), ("127.0.0.1", 2525), None, 1, FakeReactor())
    try:
        server.write(b"220 ready\r\n")
        server.write(b"250 ok\r\n")
        assert calls == [0, 1] and read_all(peer) == b"220 ready\r\n250 ok\r\n"
    finally:
        ours.close()
        peer.close()


# --- one exchange, through the eager and the plain transports -------------------------------------

BIG = 1 << 20  # much more than the small socket buffers below hold: it does not fit at once


def requests(body_lines: int) -> list[bytes]:
    """What the client writes, write by write: commands, a body that does not fit, a command behind it."""
    body = b"".join(b"%06d " % i + bytes(range(48, 122)) * 13 + b"\r\n" for i in range(body_lines))
    return [b"EHLO client.test\r\n", b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n",
            body + b".\r\n", b"NOOP\r\n", b"QUIT\r\n"]


def replies_to(line: bytes) -> list[bytes]:
    """What the server writes, write by write, for one line it read (bodies are not answered line by line)."""
    if line.startswith(b"EHLO"):  # a reply too big to fit, then one behind it
        return [b"".join(b"250-%07d padding padding padding\r\n" % i for i in range(BIG // 40)), b"250 SIZE\r\n"]
    if line == b".":
        return [b"250 2.0.0 Ok: queued\r\n"]
    if line == b"DATA":
        return [b"354 go ahead\r\n"]
    if line.startswith(b"QUIT"):
        return [b"221 2.0.0 Bye\r\n"]
    if line[:4] in (b"MAIL", b"RCPT", b"NOOP"):
        return [b"250 2.0.0 Ok\r\n"]
    return []


class Server(Protocol):
    def __init__(self, reactor: FakeReactor) -> None:
        self.reactor = reactor
        self.received = b""
        self.buffer = b""
        self.in_body = False
        self.buffered_after: list[bool] = []  # per write: whether it waits for writability

    def connectionMade(self) -> None:
        self.send(b"220 server.test ESMTP\r\n")

    def send(self, data: bytes) -> None:
        self.transport.write(data)
        self.buffered_after.append(self.transport in self.reactor.writers)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if self.in_body:
                self.in_body = line != b"."
                if self.in_body:
                    continue
            elif line == b"DATA":
                self.in_body = True
            for reply in replies_to(line):
                self.send(reply)


class Client(Protocol):
    def __init__(self, writes: list[bytes]) -> None:
        self.writes = writes
        self.received = b""

    def connectionMade(self) -> None:
        # The client pipelines everything at once, the body and what follows it corked together
        # where the transport can (as mailhost.smtp.client does).
        first, envelope, body, *rest = self.writes
        self.transport.write(first)
        self.transport.write(envelope)
        corked = getattr(self.transport, "corked", None)
        with corked() if corked is not None else nullcontext():
            self.transport.write(body)
            for each in rest:
                self.transport.write(each)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def loopback_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback, with small buffers: big writes cannot fit at once."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        client = socket.create_connection(listening.getsockname())
        server, _ = listening.accept()
    for each in (client, server):
        each.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        each.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        each.setblocking(False)
    return server, client


def exchange(plain: bool, body_lines: int) -> tuple[Server, Client, object, object]:
    """The server side built as a listening port builds it, the client side as the connector
    does and then made eager (or not), driven turn by turn like a reactor until both are done."""
    reactor = FakeReactor()
    server_socket, client_socket = loopback_pair()
    with transports(plain):
        port = tcp.Port(0, None)
        send_eagerly(port, before_write=lambda: None)
        server_protocol, client_protocol = Server(reactor), Client(requests(body_lines))
        server = port.transport(server_socket, server_protocol, client_socket.getsockname(), None, 1, reactor)
        client = tcp.Client.__new__(tcp.Client)
        tcp.Connection.__init__(client, client_socket, client_protocol, reactor)
        client.connected = True
        make_eager(client)
        client.startReading()
    try:
        server_protocol.makeConnection(server)
        client_protocol.makeConnection(client)
        wanted_by_server = len(b"".join(client_protocol.writes))
        for _ in range(100000):
            if (len(server_protocol.received) == wanted_by_server and client_protocol.received.endswith(b"221 2.0.0 Bye\r\n")
                    and not reactor.writers):
                break
            for each in list(reactor.writers):
                assert each.doWrite() is None
            for each in list(reactor.readers):
                assert each.doRead() is None
        else:
            raise AssertionError("the exchange did not finish")
    finally:
        server_socket.close()
        client_socket.close()
    return server_protocol, client_protocol, server, client


@pytest.mark.parametrize("body_lines", [1, 40, 9000])
def test_eager_and_plain_transports_deliver_the_same_bytes_in_the_same_order(body_lines: int) -> None:
    eager_server, eager_client, server, client = exchange(plain=False, body_lines=body_lines)
    assert isinstance(server, EagerServer) and isinstance(client, EagerClient)
    plain_server, plain_client, server, client = exchange(plain=True, body_lines=body_lines)
    assert type(server) is tcp.Server and type(client) is tcp.Client

    expected_requests = b"".join(requests(body_lines))
    assert eager_server.received == plain_server.received == expected_requests
    assert eager_client.received == plain_client.received
    assert eager_client.received.startswith(b"220 server.test ESMTP\r\n250-0000000 ")
    assert eager_client.received.endswith(b"250 2.0.0 Ok\r\n354 go ahead\r\n250 2.0.0 Ok: queued\r\n"
                                          b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n")
    # The plain transport buffers every write for the next turn; the eager one sends the greeting
    # at once, and only the big EHLO reply (and what comes behind it) waits.
    assert all(plain_server.buffered_after)
    assert eager_server.buffered_after[:3] == [False, True, True]


def test_the_seam_imports_nothing_of_mailhost() -> None:
    # The SMTP client uses it: through it, the client must not reach the log module (or anything else).
    import ast
    from pathlib import Path

    tree = ast.parse(Path(transport.__file__).read_text())
    names = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    names += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in names if name and name.startswith("mailhost")]
