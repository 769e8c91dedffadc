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


def test_refusal_on_the_implicit_tls_port_waits_for_the_handshake_within_a_grace(tmp_path: Path) -> None:
    world = world_with(tmp_path, "connections = 1")
    Unshaken(world, "submissions")
    refused = Unshaken(world, "submissions")
    # The 421 is handed to the TLS layer, which sends it once the handshake is done...
    assert refused.transport.value().startswith(b"421 4.7.0 ")
    assert refused.transport.disconnecting and not refused.transport.disconnected
    # ...and a handshake that does not come within the grace does not keep the connection.
    world.clock.advance(CLOSE_GRACE)
    assert refused.transport.disconnected


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
    world = world_with(tmp_path, "junk_commands = 1000000")  # EHLO is junk: not the limit tested here
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


def test_starttls_handshake_is_read_even_if_the_220_filled_the_buffer(tmp_path: Path) -> None:
    world = world_with(tmp_path)
    transport, protocol = slow_reader_session(world)
    transport.limit = 0  # every write fills it: the EHLO reply and the 220 pause the session
    transport.drain()
    protocol.pauseProducing()
    protocol.dataReceived(b"EHLO client.test\r\nSTARTTLS\r\n")  # waits for the client to read
    transport.drain()  # it reads: the session resumes, answers both, and starts TLS
    assert transport.tls_started and transport.value().endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert transport.producerState == "producing"  # the client's handshake must be read


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


# --- the session deadline -----------------------------------------------------------------

MINUTE = 60.0


def test_a_byte_every_few_seconds_does_not_keep_a_session_past_its_deadline(tmp_path: Path) -> None:
    """The idle timer never fires for a client that trickles (slowloris); the deadline does."""
    world = world_with(tmp_path)  # the defaults: 300 s idle, a 30 min session
    session = world.session("mx")
    elapsed = 0.0
    while elapsed < 30 * MINUTE - 5:
        session.protocol.dataReceived(b"N")
        world.clock.advance(5)
        elapsed += 5
    assert session.read() == "" and not session.closed
    world.clock.advance(5)
    reply = session.read()
    assert reply.startswith("421 4.4.2 ") and "Session too long" in reply
    assert session.closed


def test_deadline_during_data(tmp_path: Path) -> None:
    world = world_with(tmp_path, 'session_timeout = "10m"')
    session = world.session("mx")
    session.send("EHLO client.test")
    session.send("MAIL FROM:<someone@remote.test>")
    session.send("RCPT TO:<alice@example.test>")
    assert session.send("DATA").startswith("354")
    for _ in range(100):
        session.protocol.dataReceived(b"x" * 70 + b"\r\n")
        world.clock.advance(6)
    assert session.read().startswith("421 4.4.2 ")
    assert session.closed
    assert world.intake.accepted == []


def test_deadline_waits_for_a_reply_the_disk_owes(tmp_path: Path) -> None:
    """A 250 after DATA is a promise: a deadline that passes while the message is being
    stored lets the reply go out first, then closes."""
    world = world_with(tmp_path, 'session_timeout = "10m"')
    session = world.session("mx")
    session.send("EHLO client.test")
    session.send("MAIL FROM:<someone@remote.test>")
    session.send("RCPT TO:<alice@example.test>")
    session.send("DATA")
    world.clock.advance(10 * MINUTE - 1)
    held = defer_stores(world)
    assert session.send("Subject: x\r\n\r\nbody\r\n.") == ""
    world.clock.advance(1)
    assert session.read() == "" and not session.closed
    held.pop().callback(None)
    replies = session.read()
    assert replies.startswith("250 2.0.0 Ok: queued as ") and "\r\n421 4.4.2 " in replies
    assert session.closed


def defer_stores(world: World) -> list:
    """Make the intake's store wait until the test fires the Deferreds it returns."""
    from twisted.internet import defer

    held: list = []

    def store(copies, envelope, outbound_headers, body, signing_key=None):
        world.intake.accepted.append((copies, envelope, outbound_headers, body))
        deferred: defer.Deferred = defer.Deferred()
        held.append(deferred)
        return deferred

    world.intake.store = store
    return held


def test_deadline_in_the_tls_handshake_aborts(tmp_path: Path) -> None:
    world = world_with(tmp_path, 'session_timeout = "1m"\ntls_handshake_timeout = "5m"')
    session = Unshaken(world, "submissions")
    world.clock.advance(MINUTE)
    assert session.transport.disconnected


# --- junk commands ------------------------------------------------------------------------------

JUNK = ["NOOP", "RSET", "VRFY alice", "HELP", "EHLO client.test", "HELO client.test"]


@pytest.mark.parametrize("command", JUNK)
def test_junk_commands_beyond_the_limit_close_the_session(tmp_path: Path, command: str) -> None:
    world = world_with(tmp_path)  # the default: 100
    session = world.session("mx")
    for n in range(100):
        reply = session.send(command)
        assert reply[:1] == "2", (n, reply)
    reply = session.send(command)
    assert reply.startswith("421 4.7.0 ") and "Too many junk commands" in reply
    assert session.closed


def test_junk_commands_mixed_count_together(tmp_path: Path) -> None:
    world = world_with(tmp_path, "junk_commands = 5")
    session = world.session("mx")
    for command in JUNK[:5]:
        assert session.send(command)[:1] == "2"
    assert session.send("NOOP").startswith("421 4.7.0 ")


def test_recipients_beyond_the_limit_are_junk_too(tmp_path: Path) -> None:
    world = world_with(tmp_path, "junk_commands = 3\nrecipients = 1")
    session = world.session("mx")
    session.send("EHLO client.test")
    session.send("MAIL FROM:<someone@remote.test>")
    assert session.send("RCPT TO:<alice@example.test>").startswith("250")
    for _ in range(2):
        assert session.send("RCPT TO:<bob@example.test>").startswith("452 4.5.3")
    assert session.send("RCPT TO:<bob@example.test>").startswith("421 4.7.0 ")


def test_an_accepted_message_starts_the_count_again(tmp_path: Path) -> None:
    """A client that sends many messages over one session (with RSET or NOOP between
    them, as MTAs do) is not cut off: only commands since the last message count."""
    world = world_with(tmp_path, "junk_commands = 3")
    session = world.session("mx")
    session.send("EHLO client.test")
    for n in range(5):
        assert session.send("RSET").startswith("250")
        assert session.send("NOOP").startswith("250")
        session.send("MAIL FROM:<someone@remote.test>")
        session.send("RCPT TO:<alice@example.test>")
        session.send("DATA")
        assert session.send(f"Subject: {n}\r\n\r\nbody\r\n.").startswith("250 2.0.0")
    assert len(world.intake.accepted) == 5


# --- DATA past the size limit ---------------------------------------------------------------


def start_data(session: Session) -> None:
    session.send("EHLO client.test")
    assert session.send("MAIL FROM:<someone@remote.test>").startswith("250")
    assert session.send("RCPT TO:<alice@example.test>").startswith("250")
    assert session.send("DATA").startswith("354")


@pytest.mark.parametrize("factor", [1.5, 1.99])
def test_oversized_message_is_read_to_its_end_within_twice_the_limit(tmp_path: Path, factor: float) -> None:
    world = world_with(tmp_path, "message_size = 10240")
    session = world.session("mx")
    start_data(session)
    line = b"x" * 78 + b"\r\n"
    session.protocol.dataReceived(line * int(10240 * factor / len(line)))
    assert session.read() == ""
    assert session.send(".").startswith("552 5.3.4")
    assert session.send("NOOP").startswith("250")  # the session goes on
    assert world.intake.accepted == []


def test_data_past_twice_the_limit_is_refused_and_closed(tmp_path: Path) -> None:
    world = world_with(tmp_path, "message_size = 10240")
    session = world.session("mx")
    start_data(session)
    line = b"x" * 78 + b"\r\n"
    for _ in range(2 * 10240 // len(line)):
        session.protocol.dataReceived(line)
    assert session.read() == ""
    session.protocol.dataReceived(line * 2)
    assert session.read().startswith("552 5.3.4 ")
    assert session.closed
    session.protocol.dataReceived(line * 1000 + b".\r\nNOOP\r\n")  # no longer read
    assert session.read() == ""
    assert world.intake.accepted == []


# --- the connection cap ------------------------------------------------------------------------


def test_connections_over_all_listeners_and_addresses_are_capped(tmp_path: Path) -> None:
    world = world_with(tmp_path, "connections = 3")
    first = Session(world.factories["mx"], world.clock, source="192.0.2.1")
    world.session("submission", source="192.0.2.2")
    world.session("submissions", source="198.51.100.3")
    refused = TLSStringTransport(peerAddress=IPv4Address("TCP", "203.0.113.4", 40000))
    protocol = world.factories["mx"].buildProtocol(None)
    protocol.makeConnection(refused)
    reply = refused.value().decode()
    assert reply.startswith("421 4.7.0 ") and "Too many connections" in reply
    assert refused.disconnecting
    # One session ends (and the refused one): there is room again.
    protocol.connectionLost(None)
    first.protocol.connectionLost(None)
    again = Session(world.factories["mx"], world.clock, source="203.0.113.4")
    assert again.send("EHLO client.test").startswith("250")


# --- AUTH lines ---------------------------------------------------------------------------------

AUTH_LINE_MAX = 12288  # octets with CRLF (RFC 4954 4)


def b64_of_length(octets: int) -> str:
    """Exactly `octets` characters: a valid base64 PLAIN message nobody has, padded with
    spaces (which the server strips) to the length."""
    import base64

    text = base64.b64encode(b"\0nobody@example.test\0" + b"p" * (octets * 3 // 4)).decode()
    text = text[: octets - octets % 4]
    return text + " " * (octets - len(text))


def authing(world: World) -> Session:
    session = world.session("submission")
    session.send("EHLO client.test")
    assert session.send("AUTH PLAIN").startswith("334")
    return session


def test_a_long_sasl_response_is_read_as_one(tmp_path: Path) -> None:
    """A 600-octet response used to get 500 and leave the exchange open: the next command
    was then taken for the SASL response."""
    world = world_with(tmp_path)
    session = authing(world)
    assert session.send(b64_of_length(600)).startswith("535 5.7.8")
    assert session.send("NOOP").startswith("250 2.0.0")


@pytest.mark.parametrize("octets, reply", [(AUTH_LINE_MAX, "535 5.7.8"), (AUTH_LINE_MAX + 4, "500 5.5.6")])
def test_sasl_response_up_to_12288_octets(tmp_path: Path, octets: int, reply: str) -> None:
    world = world_with(tmp_path)
    session = authing(world)
    response = b64_of_length(octets - 2)  # with CRLF: `octets`
    assert session.send(response).startswith(reply)
    assert session.send("NOOP").startswith("250 2.0.0")  # the exchange is over either way
    assert session.protocol.user is None


def test_sasl_response_arriving_in_pieces_past_the_limit_ends_the_exchange(tmp_path: Path) -> None:
    world = world_with(tmp_path)
    session = authing(world)
    for _ in range(4):
        session.protocol.dataReceived(b"A" * 4096)
    assert session.read() == ""
    assert session.send("AAAA").startswith("500 5.5.6")
    assert session.send("NOOP").startswith("250 2.0.0")


@pytest.mark.parametrize("octets, reply", [(600, "535 5.7.8"), (AUTH_LINE_MAX, "535 5.7.8"),
                                           (AUTH_LINE_MAX + 4, "500 5.5.6")])
def test_auth_command_with_initial_response_up_to_12288_octets(tmp_path: Path, octets: int, reply: str) -> None:
    world = world_with(tmp_path)
    session = world.session("submission")
    session.send("EHLO client.test")
    line = "AUTH PLAIN " + b64_of_length(octets - len("AUTH PLAIN ") - 2)
    assert len(line) + 2 == octets
    assert session.send(line).startswith(reply)
    assert session.send("NOOP").startswith("250 2.0.0")


def test_other_commands_keep_the_512_octet_limit(tmp_path: Path) -> None:
    world = world_with(tmp_path)
    session = world.session("submission")
    session.send("EHLO client.test")
    assert session.send("NOOP " + "x" * 600).startswith("500 5.5.6")
    assert session.send("AUTHX " + "x" * 600).startswith("500 5.5.6")
