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
