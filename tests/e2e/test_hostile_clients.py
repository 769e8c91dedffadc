"""Hostile clients against the real daemon: silent TLS sockets, pipelining floods,
and the [limits] that bound what one outsider can hold (issue 13, "An outsider can
take the server down").

Each test opens raw sockets on loopback and checks what an operator would: the
server closes what it must (the socket reads EOF or a reset), answers with the
right reply code and enhanced status, and its memory stays bounded.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemon, RawSession

# How long a test waits for the server to do what it must: generous, so that a loaded
# machine does not fail it; a server that never does it fails it all the same.
PATIENCE = 30.0


def silent_sockets(port: int, count: int) -> list[socket.socket]:
    """`count` connections that never send a byte (no TLS ClientHello, nothing)."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def still_open(sockets: list[socket.socket], within: float) -> list[socket.socket]:
    """Read every socket (dropping what the server says) until the server has closed
    each one, or `within` seconds have passed; the sockets it left open."""
    open_ = list(sockets)
    deadline = time.monotonic() + within
    while open_ and time.monotonic() < deadline:
        readable, _, _ = select.select(open_, [], [], 0.5)
        for sock in readable:
            try:
                if sock.recv(65536) == b"":
                    open_.remove(sock)
            except ConnectionResetError:
                open_.remove(sock)
            except BlockingIOError:
                pass
    return open_


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


# --- TLS that never starts ------------------------------------------------------------


@pytest.mark.parametrize("limits", ["command_timeout = 2", 'tls_handshake_timeout = "2s"'],
                         ids=["idle-timeout", "handshake-timeout"])
def test_silent_sockets_on_the_implicit_tls_port_are_closed(make_daemon, limits: str) -> None:
    """No ClientHello ever comes: the greeting waits in the TLS layer, and the idle
    timeout (or the handshake's) must still end the connection (it used to wait for
    the handshake forever)."""
    daemon: Daemon = make_daemon(submission=True, limits=limits)
    sockets = silent_sockets(daemon.submissions_port, 40)
    try:
        assert still_open(sockets, PATIENCE) == []
    finally:
        close_all(sockets)
    assert_daemon_answers(daemon)


def test_silence_after_starttls_is_closed(make_daemon) -> None:
    """220 to STARTTLS, then no handshake: the connection is closed all the same."""
    daemon: Daemon = make_daemon(submission=True, limits="command_timeout = 2")
    sessions = [RawSession(daemon.submission_port) for _ in range(10)]
    try:
        for session in sessions:
            assert session.command("EHLO client.test").startswith("250")
            assert session.command("STARTTLS").startswith("220 2.0.0")
            session.sock.setblocking(False)
        assert still_open([s.sock for s in sessions], PATIENCE) == []
    finally:
        close_all([s.sock for s in sessions])


def assert_daemon_answers(daemon: Daemon) -> None:
    session = RawSession(daemon.port)
    try:
        assert session.command("EHLO client.test").startswith("250")
    finally:
        session.close()


# --- a peer that writes and never reads -------------------------------------------------

FLOOD = 16 * 2**20  # octets of pipelined EHLO: replies to all of it would take ~300 MB
MEMORY_BOUND = 100 * 2**20  # what one such client may add to the daemon's resident memory


def resident(pid: int) -> int:
    """The process's resident memory in octets (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def flood(sock: socket.socket, line: bytes, total: int, stall: float = 3.0) -> int:
    """Write `line` over and over, never reading, until `total` octets are sent or the
    server has taken nothing for `stall` seconds; how many octets it took."""
    chunk = line * (65536 // len(line))
    sent = 0
    sock.setblocking(False)
    while sent < total:
        _, writable, _ = select.select([], [sock], [], stall)
        if not writable:
            break
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            break
    return sent


def test_pipelining_flood_without_reading_does_not_grow_memory(make_daemon) -> None:
    # EHLO is a junk command: without this the session ends at the 101st, and the
    # flood would test that limit instead of the backpressure.
    daemon: Daemon = make_daemon(limits="junk_commands = 1000000000")
    pid = daemon.process.pid
    before = resident(pid)
    session = RawSession(daemon.port)
    try:
        sent = flood(session.sock, b"EHLO x\r\n", FLOOD)
        # Whatever the daemon took, it has had time to answer (or to hold back) by now.
        peak = max(resident(pid) for _ in range(10) if time.sleep(0.2) is None)
        assert peak - before < MEMORY_BOUND, f"resident memory grew by {(peak - before) >> 20} MiB after {sent >> 20} MiB"
    finally:
        session.close()
    assert_daemon_answers(daemon)


# --- the connection cap ---------------------------------------------------------------------


def test_connection_cap_counts_every_listener_and_address(make_daemon) -> None:
    daemon: Daemon = make_daemon(submission=True, limits="connections = 3")
    sessions = [RawSession(daemon.port, source="127.0.0.1"), RawSession(daemon.port, source="127.0.0.2"),
                RawSession(daemon.submission_port, source="127.0.0.3")]
    try:
        refused = RawSession(daemon.submission_port, source="127.0.0.4", greeting=False)
        reply = refused.reply()
        assert reply.startswith("421 4.7.0 ") and "Too many connections" in reply
        assert refused.closed()
        refused.close()
        assert sessions[0].command("QUIT").startswith("221 2.0.0")
        assert sessions[0].closed()
        # The server has forgotten the session that ended: there is room for one more.
        again = RawSession(daemon.port, source="127.0.0.4")
        sessions.append(again)
        assert again.command("EHLO client.test").startswith("250")
    finally:
        for session in sessions:
            session.close()
