"""Strict on input, seen from outside: smuggling, long lines, bad bytes, early talkers,
HTTP, error and resource limits, timeouts, disk errors and commands out of order.

Each test talks to the real daemon over a raw socket and checks what a user would:
the reply code with its enhanced status code, what is (or is not) in the Maildirs
afterwards, and whether the session is still usable or has been closed.

Tests that need no special configuration share one daemon per module (and tell their
messages apart by a unique token); the others start their own.
"""

from __future__ import annotations

import resource
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemon, RawSession

USERS = ("alice@example.test", "bob@example.test", "carol@other.test")
ALICE = "alice@example.test"
BOB = "bob@example.test"
SOCKET_TIMEOUT = 5


# --- helpers -----------------------------------------------------------------


def token() -> str:
    return uuid.uuid4().hex


def expect(reply: str, code: str) -> None:
    """`code` is "550 5.6.11", "354" or "501": the reply (its last line) must start with it."""
    last = reply.split("\n")[-1]
    assert last.startswith(code + " "), f"expected {code}, got {reply!r}"


def clean_message(mark: str) -> bytes:
    return (
        f"From: <sender@client.test>\r\nTo: <alice@example.test>\r\nSubject: {mark}\r\n\r\n"
        f"Hello {mark}\r\n.\r\n"
    ).encode()


def transaction(session: RawSession, data: bytes, rcpts: tuple[str, ...] = (ALICE,),
                sender: str = "sender@client.test") -> str:
    """MAIL, RCPT (each must be accepted), DATA, then `data` as sent; the reply after the data."""
    expect(session.command(f"MAIL FROM:<{sender}>"), "250 2.1.0")
    for rcpt in rcpts:
        expect(session.command(f"RCPT TO:<{rcpt}>"), "250 2.1.5")
    expect(session.command("DATA"), "354")
    session.send(data)
    return session.reply()


def delivered(daemon: Daemon, user: str, mark: str, domain: str = "example.test") -> int:
    """How many messages in user's Maildir (read with `mailbox`) hold `mark`."""
    return sum(mark.encode() in message.as_bytes() for message in daemon.messages(user, domain))


def stored_anywhere(daemon: Daemon, mark: str) -> list[str]:
    """Files in any Maildir folder (new/, cur/ or tmp/) of any user that hold `mark`."""
    root = daemon.root / "mail"
    return sorted(str(path.relative_to(root)) for path in root.glob("*/*/*/*")
                  if path.is_file() and mark.encode() in path.read_bytes())


def maildir_files(daemon: Daemon, user: str, folder: str, domain: str = "example.test") -> list[str]:
    path = daemon.root / "mail" / domain / user / folder
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def assert_usable(daemon: Daemon, session: RawSession, hello: bool = False) -> None:
    """A clean message on the same session is accepted and lands in alice's Maildir."""
    if hello:
        expect(session.command("EHLO client.test"), "250")
    mark = token()
    expect(transaction(session, clean_message(mark)), "250 2.0.0")
    assert delivered(daemon, "alice", mark) == 1


def start_daemon(root: Path, **kwargs) -> Daemon:
    daemon = Daemon(root, **kwargs)
    daemon.seed_users(list(USERS))
    daemon.start()
    return daemon


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[Daemon]:
    """One daemon with the default test configuration for every test that needs nothing more."""
    daemon = start_daemon(tmp_path_factory.mktemp("shared"))
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def pausing(tmp_path_factory) -> Iterator[Daemon]:
    """greet_pause of 2 s for everyone outside relay.networks (only 127.0.0.1 is inside)."""
    daemon = start_daemon(tmp_path_factory.mktemp("pausing"), limits='greet_pause = "2s"',
                          relay_networks='["127.0.0.1/32"]')
    yield daemon
    daemon.stop()


@pytest.fixture
def connect() -> Iterator:
    """Open raw sessions to a daemon; all closed at the end of the test."""
    sessions: list[RawSession] = []

    def open_session(daemon: Daemon, **kwargs) -> RawSession:
        session = RawSession(daemon.port, **kwargs)
        session.sock.settimeout(SOCKET_TIMEOUT)
        sessions.append(session)
        return session

    yield open_session
    for session in sessions:
        session.close()


@pytest.fixture
def session(shared, connect) -> RawSession:
    """A greeted session on the shared daemon, after EHLO."""
    s = connect(shared)
    expect(s.command("EHLO client.test"), "250")
    return s


# --- 1. SMTP smuggling ---------------------------------------------------------

# Every line ending a lenient server might take for the end of DATA.
SMUGGLING_VECTORS = {
    "LF.LF": (b"\n.\n", "550 5.6.11"),
    "LF.CRLF": (b"\n.\r\n", "550 5.6.11"),
    "CR.LF": (b"\r.\n", "550 5.6.11"),
    "CR.CRLF": (b"\r.\r\n", "550 5.6.11"),
    "CRLF.CR": (b"\r\n.\r", "550 5.6.11"),
    "CRLF.LF": (b"\r\n.\n", "550 5.6.11"),
    "CRLF-NUL.CRLF": (b"\r\n\x00.\r\n", "550 5.6.0"),
}

# How the smuggled transaction ends: closed by the real end of data the relay appends
# (the classic attack), or carrying its own "\r\n.\r\n" before the real one. In the
# second shape the real end's two lines ("" and ".") are left over as commands.
SMUGGLED_ENDINGS = {
    "relay-terminated": (b"", 0),
    "self-terminated": (b"\r\n.\r\n", 2),
}


@pytest.mark.parametrize("ending", list(SMUGGLED_ENDINGS))
@pytest.mark.parametrize("vector", list(SMUGGLING_VECTORS))
def test_smuggling_vector_refused_and_nothing_smuggled(shared, session, vector, ending):
    shape, refusal = SMUGGLING_VECTORS[vector]
    own_end, leftover_lines = SMUGGLED_ENDINGS[ending]
    outer, smuggled = token(), token()
    data = (
        f"From: <sender@client.test>\r\nSubject: {outer}\r\n\r\nfirst {outer}".encode()
        + shape
        + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        + f"From: <admin@example.test>\r\nSubject: smuggled\r\n\r\nsmuggled {smuggled}".encode()
        + own_end
        + b"\r\n.\r\n"
    )
    expect(transaction(session, data), refusal)
    for _ in range(leftover_lines):
        expect(session.reply(), "500")  # an empty line, then ".": neither is a command
    assert stored_anywhere(shared, smuggled) == []
    assert stored_anywhere(shared, outer) == []
    assert delivered(shared, "bob", smuggled) == 0
    assert_usable(shared, session)


# --- 2. Long lines -------------------------------------------------------------


@pytest.mark.parametrize(("octets", "code"), [(512, "250 2.0.0"), (513, "500 5.5.6")])
def test_command_line_limit_is_512_octets_with_crlf(session, octets, code):
    line = "NOOP " + "x" * (octets - len("NOOP ") - 2)
    assert len(line) + 2 == octets
    expect(session.command(line), code)
    expect(session.command("NOOP"), "250 2.0.0")  # exactly one reply for the line


@pytest.mark.parametrize("pieces", [1, 4], ids=["one-write", "trickled"])
def test_long_command_line_refused_and_transaction_kept(shared, session, pieces):
    expect(session.command("MAIL FROM:<sender@client.test>"), "250 2.1.0")
    expect(session.command(f"RCPT TO:<{ALICE}>"), "250 2.1.5")
    line = f"RCPT TO:<{'b' * 2000}@example.test>\r\n".encode()
    size = -(-len(line) // pieces)
    for start in range(0, len(line), size):
        session.send(line[start:start + size])
        if pieces > 1:
            time.sleep(0.05)  # let each piece arrive on its own
    expect(session.reply(), "500 5.5.6")
    # The MAIL and RCPT before the long line still stand: DATA goes straight on.
    expect(session.command("DATA"), "354")
    mark = token()
    session.send(clean_message(mark))
    expect(session.reply(), "250 2.0.0")
    assert delivered(shared, "alice", mark) == 1


def test_body_line_of_1000_octets_with_crlf_is_accepted(shared, session):
    mark = token()
    line = (mark + "y" * (998 - len(mark))).encode()
    expect(transaction(session, b"Subject: long\r\n\r\n" + line + b"\r\n.\r\n"), "250 2.0.0")
    [message] = [m for m in shared.messages("alice") if mark.encode() in m.as_bytes()]
    assert line in message.as_bytes()


@pytest.mark.parametrize("hops, code", [(50, "250 2.0.0"), (51, "554 5.4.6")])
def test_more_than_50_received_fields_is_a_mail_loop(shared, session, hops, code):
    mark = token()
    received = b"".join(b"Received: from hop%d.client.test by mx.client.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i
                        for i in range(hops))
    # The word in the body does not count: only the header block's fields do (RFC 5321 6.3).
    body = b"received " * 60 + b"\r\n"
    expect(transaction(session, received + f"Subject: {mark}\r\n\r\n".encode() + body + b".\r\n"), code)
    if hops > 50:
        assert stored_anywhere(shared, mark) == []
    else:
        assert delivered(shared, "alice", mark) == 1


@pytest.mark.parametrize("length", [999, 70000])
def test_long_body_line_refused_at_end_of_data_without_running_what_follows(shared, session, length):
    outer, smuggled = token(), token()
    data = (
        f"Subject: {outer}\r\n\r\n".encode()
        + b"z" * length + b"\r\n"
        + b"RSET\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        + f"smuggled {smuggled}\r\n".encode()
        + b".\r\n"
    )
    expect(transaction(session, data), "500 5.5.6")
    # One reply only: the lines after the long one were message text, not commands.
    expect(session.command("NOOP"), "250 2.0.0")
    assert stored_anywhere(shared, smuggled) == []
    assert stored_anywhere(shared, outer) == []
    assert_usable(shared, session)


# --- 3. NUL, 8-bit and SMTPUTF8 ------------------------------------------------


@pytest.mark.parametrize("line", [
    b"NOOP \x00",
    b"EHLO x\x00y",
    b"MAIL FROM:<a\x00b@client.test>",
    "EHLO héllo".encode(),
    "NOOP é".encode(),
    b"MAIL FROM:<d\xe9@client.test>",  # Latin-1, not UTF-8
], ids=["NUL-NOOP", "NUL-EHLO", "NUL-MAIL", "utf8-EHLO", "utf8-NOOP", "latin1-MAIL"])
def test_nul_or_8bit_in_command_refused(shared, session, line):
    session.send(line + b"\r\n")
    expect(session.reply(), "500 5.5.2")
    assert_usable(shared, session)


@pytest.mark.parametrize("commands", [
    ["MAIL FROM:<dé@x.test>"],
    ["MAIL FROM:<sender@client.test>", "RCPT TO:<dé@example.test>"],
], ids=["sender", "recipient"])
def test_non_ascii_address_without_smtputf8_refused(shared, session, commands):
    *before, last = commands
    for command in before:
        expect(session.command(command), "250")
    expect(session.command(last), "553 5.6.7")
    expect(session.command("RSET"), "250 2.0.0")
    assert_usable(shared, session)


def test_non_ascii_sender_with_smtputf8_delivered(shared, session):
    mark = token()
    expect(session.command("MAIL FROM:<dé@x.test> SMTPUTF8"), "250 2.1.0")
    expect(session.command(f"RCPT TO:<{ALICE}>"), "250 2.1.5")
    expect(session.command("DATA"), "354")
    session.send(f"From: <dé@x.test>\r\nSubject: {mark}\r\n\r\nHéllo {mark}\r\n.\r\n".encode())
    expect(session.reply(), "250 2.0.0")
    maildir = shared.maildir("alice")
    [raw] = [maildir.get_bytes(key) for key in maildir.keys() if mark.encode() in maildir.get_bytes(key)]
    assert "Return-Path: <dé@x.test>\n".encode() in raw
    assert f"Héllo {mark}\n".encode() in raw


# --- 4. Early talkers ------------------------------------------------------------


def test_early_talker_refused_and_disconnected(pausing, connect):
    s = connect(pausing, source="127.0.0.2", greeting=False)
    s.send(b"EHLO x\r\n")
    expect(s.reply(), "554 5.5.1")
    assert s.closed()


def test_patient_client_greeted_after_the_pause(pausing, connect):
    started = time.monotonic()
    s = connect(pausing, source="127.0.0.2", greeting=False)
    expect(s.reply(), "220")
    assert time.monotonic() - started >= 1.8
    expect(s.command("EHLO client.test"), "250")


def test_client_in_relay_networks_greeted_at_once(pausing, connect):
    s = connect(pausing, source="127.0.0.1", greeting=False)
    s.sock.settimeout(1.0)  # well inside the 2 s pause: a paused greeting would time this read out
    expect(s.reply(), "220")
    s.sock.settimeout(10)
    expect(s.command("EHLO client.test"), "250")


# --- 5. HTTP ---------------------------------------------------------------------


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: mail.example.test\r\nUser-Agent: test\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: mail.example.test\r\nContent-Type: text/plain\r\nContent-Length: 101\r\n\r\n"
    b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: MARK\r\n\r\nfrom a browser\r\n.\r\n",
], ids=["GET", "POST"])
def test_http_request_closes_connection(shared, connect, request_bytes):
    mark = token()
    s = connect(shared)
    s.send(request_bytes.replace(b"MARK", mark.encode()))
    expect(s.reply(), "554")
    assert s.closed()
    assert stored_anywhere(shared, mark) == []


# --- 6. Too many errors ----------------------------------------------------------


def test_ten_errors_close_the_session(session):
    for n in range(10):
        expect(session.command(f"XYZZY{chr(ord('A') + n)}"), "500 5.5.1")
    expect(session.reply(), "421 4.7.0")
    assert session.closed()


# --- 7. Recipients limit -----------------------------------------------------------


def test_recipients_limit_refuses_the_fourth_and_delivers_to_three(make_daemon, connect):
    daemon = make_daemon(limits="recipients = 3", start=False)
    daemon.add_user("dave@example.test")
    daemon.start()
    s = connect(daemon)
    expect(s.command("EHLO client.test"), "250")
    expect(s.command("MAIL FROM:<sender@client.test>"), "250 2.1.0")
    expect(s.command("RCPT TO:<nobody@example.test>"), "550")  # refused ones do not count
    for rcpt in ("alice@example.test", "bob@example.test", "carol@other.test"):
        expect(s.command(f"RCPT TO:<{rcpt}>"), "250 2.1.5")
    expect(s.command("RCPT TO:<dave@example.test>"), "452 4.5.3")
    expect(s.command("DATA"), "354")
    mark = token()
    s.send(clean_message(mark))
    expect(s.reply(), "250 2.0.0")
    assert delivered(daemon, "alice", mark) == 1
    assert delivered(daemon, "bob", mark) == 1
    assert delivered(daemon, "carol", mark, domain="other.test") == 1
    assert daemon.messages("dave") == []


# --- 8. Timeouts -------------------------------------------------------------------


def test_idle_session_times_out(make_daemon, connect):
    daemon = make_daemon(limits="command_timeout = 2")
    s = connect(daemon)
    expect(s.command("EHLO client.test"), "250")
    # Activity keeps a session alive past the timeout...
    for _ in range(2):
        time.sleep(1.2)
        expect(s.command("NOOP"), "250 2.0.0")
    # ...silence ends it.
    expect(s.reply(), "421 4.4.2")
    assert s.closed(timeout=2)


# --- 9. Connections per address --------------------------------------------------------


def test_connections_per_ip_limit(make_daemon, connect):
    daemon = make_daemon(limits="connections_per_ip = 2")
    first, second = connect(daemon), connect(daemon)
    third = connect(daemon, greeting=False)
    expect(third.reply(), "421 4.7.0")
    assert third.closed()
    expect(first.command("QUIT"), "221 2.0.0")
    assert first.closed()
    fourth = connect(daemon, greeting=False)
    expect(fourth.reply(), "220")
    for s in (second, fourth):
        expect(s.command("EHLO client.test"), "250")


# --- 10. Disk write error ----------------------------------------------------------------


def test_disk_write_error_is_451_and_leaves_nothing(make_daemon, connect):
    daemon = make_daemon(start=False)
    daemon.start(preexec=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)))
    s = connect(daemon)
    expect(s.command("EHLO client.test"), "250")
    big = token()
    data = f"Subject: {big}\r\n\r\n".encode() + (b"w" * 78 + b"\r\n") * 2600 + b".\r\n"  # ~200 KiB
    expect(transaction(s, data, rcpts=(ALICE, BOB)), "451 4.3.0")
    for user in ("alice", "bob"):
        assert daemon.messages(user) == []
        assert maildir_files(daemon, user, "tmp") == []
    mark = token()
    expect(transaction(s, clean_message(mark), rcpts=(ALICE, BOB)), "250 2.0.0")
    assert delivered(daemon, "alice", mark) == 1
    assert delivered(daemon, "bob", mark) == 1
    assert stored_anywhere(daemon, big) == []


# --- 11. Commands out of order and bad syntax --------------------------------------------


@pytest.mark.parametrize(("before", "command", "code"), [
    (["EHLO client.test"], "RCPT TO:<alice@example.test>", "503 5.5.1"),
    ([], "MAIL FROM:<a@b.test>", "503 5.5.1"),
    (["EHLO client.test"], "DATA", "503 5.5.1"),
    (["EHLO client.test", "MAIL FROM:<a@b.test>"], "MAIL FROM:<a@b.test>", "503 5.5.1"),
    (["EHLO client.test"], "FROBNICATE", "500 5.5.1"),
    (["EHLO client.test"], "MAIL FROM:<a@b.test> FOO=bar", "555 5.5.4"),
    (["EHLO client.test"], "MAIL FROM:bad", "501"),
], ids=["RCPT-before-MAIL", "MAIL-before-EHLO", "DATA-before-MAIL", "nested-MAIL", "unknown-command",
        "unknown-MAIL-parameter", "MAIL-without-brackets"])
def test_wrong_order_or_syntax_refused_and_session_usable(shared, connect, before, command, code):
    s = connect(shared)
    for line in before:
        expect(s.command(line), "250")
    expect(s.command(command), code)
    assert_usable(shared, s, hello=True)


def test_data_without_accepted_recipients_refused(shared, session):
    expect(session.command("MAIL FROM:<sender@client.test>"), "250 2.1.0")
    expect(session.command("RCPT TO:<nobody@example.test>"), "550")
    reply = session.command("DATA")
    assert reply.startswith(("554 5.5.1 ", "503 5.5.1 ")), reply
    expect(session.command("RSET"), "250 2.0.0")
    assert_usable(shared, session)
