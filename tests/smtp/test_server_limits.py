"""What bounds one session, in-process on a fake clock: TLS handshakes that never end,
closing replies nobody reads, peers that do not read, the session deadline, junk
commands, oversized DATA, the connection cap and AUTH line lengths (issue 13).

The sessions are tests/smtp/test_server_auth.py's: a StringTransport, the real
intake with a recording store, twisted.cred with cheap hashes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address

from mailhost.smtp.server import CLOSE_GRACE
from tests.smtp.test_server_auth import Session, TLSStringTransport, World


def world_with(tmp_path: Path, limits: str = "") -> World:
    return World(tmp_path, limits=limits)


class Unshaken:
    """A session whose TLS handshake has not ended (the client sent no ClientHello)."""

    def __init__(self, world: World, role: str) -> None:
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
        self.protocol = world.factories[role].buildProtocol(None)
        self.protocol.callLater = world.clock.callLater
        self.protocol.makeConnection(self.transport)


# --- TLS handshakes that never end ------------------------------------------------------


def test_implicit_tls_handshake_that_never_ends_is_aborted(tmp_path: Path) -> None:
    world = world_with(tmp_path, 'tls_handshake_timeout = "10s"')
    session = Unshaken(world, "submissions")
    world.clock.advance(9.9)
    assert not session.transport.disconnected
    world.clock.advance(0.1)
    assert session.transport.disconnected  # aborted: nothing waits for the handshake


def test_starttls_handshake_that_never_ends_is_aborted(tmp_path: Path) -> None:
    world = world_with(tmp_path, 'tls_handshake_timeout = "10s"')
    session = Session(world.factories["submission"], world.clock)
    session.send("EHLO client.test")
    assert session.send("STARTTLS").startswith("220 2.0.0")
    world.clock.advance(10)
    assert session.transport.disconnected


def test_finished_handshake_is_not_aborted(tmp_path: Path) -> None:
    world = world_with(tmp_path, 'tls_handshake_timeout = "10s"')
    session = world.session("submission")  # STARTTLS, handshake done
    world.clock.advance(60)
    assert not session.closed
    assert session.send("NOOP").startswith("250 2.0.0")


def test_idle_timeout_during_the_handshake_aborts_at_once(tmp_path: Path) -> None:
    world = world_with(tmp_path, "command_timeout = 5")  # before the 30 s handshake timeout
    session = Unshaken(world, "submissions")
    world.clock.advance(5)
    assert session.transport.disconnected


def test_closing_reply_nobody_reads_does_not_hold_the_connection(tmp_path: Path) -> None:
    world = world_with(tmp_path, "command_timeout = 5")
    session = world.session("mx")
    world.clock.advance(5)
    assert session.read().startswith("421 4.4.2")
    assert session.closed and not session.transport.disconnected  # closing, the 421 on its way
    # The client never reads the 421 (so loseConnection() never finishes): dropped after a grace.
    world.clock.advance(CLOSE_GRACE)
    assert session.transport.disconnected


@pytest.mark.parametrize("role", ["mx", "submission", "submissions"])
def test_quit_closes_without_aborting(tmp_path: Path, role: str) -> None:
    world = world_with(tmp_path)
    session = world.session(role)
    assert session.send("QUIT").startswith("221 2.0.0")
    assert session.closed and not session.transport.disconnected


# --- a peer that does not read ---------------------------------------------------------


class SlowReaderTransport(TLSStringTransport):
    """Like a TCP transport to a client that reads nothing: past `limit` unsent octets it
    pauses its producer (as twisted.internet.abstract.FileDescriptor does); drain()
    is the client reading everything, which resumes it."""

    limit = 64 * 1024

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) > self.limit:
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return data


def slow_reader_session(world: World) -> tuple[SlowReaderTransport, object]:
    transport = SlowReaderTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
    protocol = world.factories["mx"].buildProtocol(None)
    protocol.callLater = world.clock.callLater
    protocol.makeConnection(transport)
    assert transport.producer is protocol  # the session is its transport's producer
    return transport, protocol


def test_peer_that_does_not_read_stops_being_read(tmp_path: Path) -> None:
    world = world_with(tmp_path)
    transport, protocol = slow_reader_session(world)
    transport.drain()
    flood = b"EHLO x\r\n" * 20_000  # 160 KB in, about 3 MB of replies if all were answered
    protocol.dataReceived(flood)
    # Replies stop within about one piece past the transport's limit, and so does reading.
    assert len(transport.value()) < 4 * transport.limit
    assert transport.producerState == "paused"
    answered = transport.value().count(b"250 HELP\r\n")
    # The client reads: the session goes on where it stopped, and stops again.
    transport.drain()
    assert 0 < transport.value().count(b"250 HELP\r\n") < 20_000 - answered
    # Reading everything, the client gets every reply, in order, and the session reads again.
    total = answered
    while transport.producerState == "paused":
        total += transport.drain().count(b"250 HELP\r\n")
    total += transport.drain().count(b"250 HELP\r\n")
    assert total == 20_000
    assert transport.producerState == "producing"


def test_paused_session_runs_no_buffered_command(tmp_path: Path) -> None:
    world = world_with(tmp_path)
    transport, protocol = slow_reader_session(world)
    transport.drain()
    protocol.pauseProducing()  # the transport's buffer is full
    assert transport.producerState == "paused"
    protocol.dataReceived(b"EHLO client.test\r\nQUIT\r\n")
    assert transport.value() == b"" and not transport.disconnecting
    protocol.resumeProducing()
    replies = transport.value().decode()
    assert "250 HELP\r\n" in replies and replies.endswith("221 2.0.0 Bye\r\n")
    assert transport.disconnecting
