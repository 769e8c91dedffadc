"""The server's roles, AUTH exchange and submission rules, in-process.

A session runs on a StringTransport with a fake clock; credentials go through
the real twisted.cred portal and users-file checker (with a cheap scrypt cost
and a runner that answers at once, or when a test says so). What a message
would be stored as is caught by a stand-in for the intake.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from mailhost.local.auth import AuthSlowdown, SubmitterRealm, UsersFileChecker
from mailhost.config import load
from mailhost.intake.cleanup import Intake, signed_body
from mailhost.multiproc.shard import EVERYTHING
from mailhost.authn.dkim import Signer, generate
from mailhost.local.mailbox import LocalDomains
from mailhost.ops.metrics import Metrics
from mailhost.smtp.server import ServerContext, SMTPServerFactory
from mailhost.feedback.suppression import SuppressionList
from mailhost.local.users import UserEntry, hash_password, write_users

CONFIG = """
[server]
hostname = "mail.example.test"
state_dir = "state"

[[listener]]
role = "mx"
endpoint = "tcp:2525:interface=127.0.0.1"

[limits]
auth_failures = 3
greet_pause = "0s"
{limits}

[submission]
hide_client = {hide}

[relay]
nameservers = ["127.0.0.1:9"]  # tests never ask a real resolver

[inbound]
authenticate = false  # these tests are about AUTH; inbound checks have their own

[[domain]]
name = "example.test"
users = "users"
[domain.aliases]
team = ["alice", "bob"]
"""

PASSWORD = "s3cret pass"
CHEAP = 4


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def plain(authzid: str, authcid: str, password: str) -> str:
    return b64(f"{authzid}\0{authcid}\0{password}")


PLAIN_OK = plain("", "alice@example.test", PASSWORD)
PLAIN_BAD = plain("", "alice@example.test", "wrong")


class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it."""

    tls_started = False

    def startTLS(self, context: Any) -> None:
        self.tls_started = True


class RecordingIntake(Intake):
    """The real intake, every step of it, but remembering what it would store instead of writing it."""

    accepted: list[tuple[list, Any, bytes, bytes]]

    def store(self, copies: list, envelope: Any, outbound_headers: bytes, body: bytes,
              signing_key: Any = None) -> defer.Deferred:
        body = signed_body(body, signing_key)
        self.accepted.append((copies, envelope, outbound_headers, body))
        return defer.succeed(None)


class Runner:
    """The auth thread pool's stand-in: answers at once, or holds answers while `hold` is set."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[tuple[defer.Deferred, Callable[[], Any]]] = []
        self.calls = 0

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        self.calls += 1
        if not self.hold:
            return defer.maybeDeferred(function, *args)
        deferred: defer.Deferred = defer.Deferred()
        self.held.append((deferred, lambda: function(*args)))
        return deferred

    def release(self) -> None:
        for deferred, call in self.held:
            deferred.callback(call())
        self.held.clear()


class Session:
    def __init__(self, factory: SMTPServerFactory, clock: Clock, source: str = "192.0.2.1") -> None:
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", source, 40000))
        self.protocol = factory.buildProtocol(None)
        self.protocol.callLater = clock.callLater  # the idle timeout runs on the fake clock too
        self.protocol.makeConnection(self.transport)
        if factory.implicit_tls:
            self.protocol.handshakeCompleted()  # what the TLS layer says once the client's handshake is done
        assert self.read().startswith("220 ")

    def read(self) -> str:
        data = self.transport.value().decode()
        self.transport.clear()
        return data

    def send(self, line: str) -> str:
        self.protocol.dataReceived(line.encode() + b"\r\n")
        return self.read()

    def starttls(self) -> None:
        assert self.send("STARTTLS").startswith("220 2.0.0")
        assert self.transport.tls_started
        self.protocol.handshakeCompleted()

    def login(self) -> None:
        assert "AUTH PLAIN LOGIN" in self.send("EHLO client.test")
        assert self.send(f"AUTH PLAIN {PLAIN_OK}").startswith("235 2.7.0")

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


class World:
    def __init__(self, root: Path, hide_client: bool = False, limits: str = "") -> None:
        (root / "mailhost.toml").write_text(CONFIG.format(hide="true" if hide_client else "false", limits=limits))
        password_hash = hash_password(PASSWORD, log_n=CHEAP)
        write_users(root / "users", {
            a: UserEntry(a, password_hash) for a in ("alice@example.test", "bob@example.test")
        })
        self.config = load(root / "mailhost.toml")
        self.domains = LocalDomains(self.config)
        self.clock = Clock()
        self.runner = Runner()
        checker = UsersFileChecker(self.domains, self.runner, dummy_hash=hash_password("x", log_n=CHEAP),
                                   clock=self.clock)
        suppression = SuppressionList(root / "suppression.json")
        self.intake = RecordingIntake(self.config, None, None, self.domains, Signer(root), suppression, self.runner,
                                      EVERYTHING)
        self.intake.accepted = []
        self.context = ServerContext(self.config, self.domains, self.intake, object(), Portal(SubmitterRealm(), [checker]),
                                     AuthSlowdown(self.clock, free=self.config.limits.auth_failures), Metrics())
        self.factories = {role: SMTPServerFactory(role, self.context, self.clock)
                          for role in ("mx", "submission", "submissions")}

    def session(self, role: str, source: str = "192.0.2.1", tls: bool = True) -> Session:
        session = Session(self.factories[role], self.clock, source)
        if role == "submission" and tls:
            session.send("EHLO client.test")
            session.starttls()
        return session


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.fixture
def logged() -> Iterator[list[str]]:
    events: list[str] = []

    def observe(event: dict) -> None:
        events.append(repr(event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


# --- what each role offers -----------------------------------------------------


def test_mx_never_offers_or_takes_auth(world: World) -> None:
    session = world.session("mx")
    assert "AUTH" not in session.send("EHLO client.test")
    session.starttls()
    assert "AUTH" not in session.send("EHLO client.test")
    assert session.send(f"AUTH PLAIN {PLAIN_OK}").startswith("502 5.5.1")
    assert session.send("MAIL FROM:<alice@example.test>").startswith("250")  # anonymous, as always


def test_submission_before_tls(world: World) -> None:
    session = world.session("submission", tls=False)
    ehlo = session.send("EHLO client.test")
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo
    assert session.send(f"AUTH PLAIN {PLAIN_OK}").startswith("538 5.7.11")
    assert session.send("AUTH LOGIN").startswith("538 5.7.11")
    for command in ("MAIL FROM:<alice@example.test>", "RCPT TO:<bob@example.test>", "DATA", "VRFY bob"):
        reply = session.send(command)
        assert reply.startswith("530 5.7.0") and "STARTTLS" in reply, command
    assert session.send("NOOP").startswith("250")
    assert session.protocol.user is None


def test_submission_after_tls_wants_auth_before_mail(world: World) -> None:
    session = world.session("submission")
    ehlo = session.send("EHLO client.test")
    assert "AUTH PLAIN LOGIN" in ehlo and "STARTTLS" not in ehlo
    assert session.send("MAIL FROM:<alice@example.test>").startswith("530 5.7.0")
    assert session.send(f"AUTH PLAIN {PLAIN_OK}").startswith("235 2.7.0")
    assert session.send("MAIL FROM:<alice@example.test>").startswith("250 2.1.0")
    assert session.send("RCPT TO:<someone@remote.test>").startswith("250 2.1.5")  # relays once authenticated


def test_submissions_is_tls_from_the_start(world: World) -> None:
    session = world.session("submissions")
    ehlo = session.send("EHLO client.test")
    assert "AUTH PLAIN LOGIN" in ehlo and "STARTTLS" not in ehlo
    assert session.send("STARTTLS").startswith("503 5.5.1")
    assert session.send("MAIL FROM:<alice@example.test>").startswith("530 5.7.0")
    assert session.send(f"AUTH PLAIN {PLAIN_OK}").startswith("235 2.7.0")


# --- the AUTH exchange ----------------------------------------------------------

EXCHANGES = [
    # (lines after EHLO, expected reply prefixes)
    ([f"AUTH PLAIN {PLAIN_OK}"], ["235 2.7.0"]),
    ([f"auth plain {PLAIN_OK}"], ["235 2.7.0"]),
    (["AUTH PLAIN", PLAIN_OK], ["334 \r\n", "235 2.7.0"]),
    ([f"AUTH PLAIN {plain('alice@example.test', 'alice@example.test', PASSWORD)}"], ["235 2.7.0"]),
    (["AUTH LOGIN", b64("alice@example.test"), b64(PASSWORD)], ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "235 2.7.0"]),
    ([f"AUTH LOGIN {b64('alice@example.test')}", b64(PASSWORD)], ["334 UGFzc3dvcmQ6", "235 2.7.0"]),
    ([f"AUTH PLAIN {PLAIN_BAD}"], ["535 5.7.8"]),
    (["AUTH LOGIN", b64("alice@example.test"), b64("wrong")], ["334 ", "334 ", "535 5.7.8"]),
    ([f"AUTH PLAIN {plain('', 'nobody@example.test', PASSWORD)}"], ["535 5.7.8"]),
    ([f"AUTH PLAIN {plain('bob@example.test', 'alice@example.test', PASSWORD)}"], ["535 5.7.8"]),  # acting for bob
    (["AUTH PLAIN not-base64!"], ["501 5.5.2"]),
    (["AUTH PLAIN", "*"], ["334 ", "501 5.5.2"]),
    (["AUTH LOGIN", "*"], ["334 ", "501 5.5.2"]),
    (["AUTH LOGIN", b64("alice@example.test"), "*"], ["334 ", "334 ", "501 5.5.2"]),
    (["AUTH LOGIN", "%%%"], ["334 ", "501 5.5.2"]),
    ([f"AUTH PLAIN {b64('no separators')}"], ["501 5.5.2"]),
    (["AUTH PLAIN ="], ["501 5.5.2"]),  # an empty response is no PLAIN message
    (["AUTH CRAM-MD5"], ["504 5.5.4"]),
    (["AUTH"], ["501 5.5.4"]),
    ([f"AUTH PLAIN {PLAIN_OK}", f"AUTH PLAIN {PLAIN_OK}"], ["235 2.7.0", "503 5.5.1"]),
    # after a cancelled or refused exchange the session takes commands again
    (["AUTH PLAIN", "*", "NOOP"], ["334 ", "501 5.5.2", "250 2.0.0"]),
]


@pytest.mark.parametrize("lines, replies", EXCHANGES, ids=[" / ".join(lines)[:60] for lines, _ in EXCHANGES])
def test_auth_exchange(world: World, lines: list[str], replies: list[str]) -> None:
    session = world.session("submission")
    session.send("EHLO client.test")
    got = [session.send(line) for line in lines]
    assert [g[: len(r)] for g, r in zip(got, replies)] == replies, got


def test_auth_before_ehlo(world: World) -> None:
    session = Session(world.factories["submissions"], world.clock)
    assert session.send(f"AUTH PLAIN {PLAIN_OK}").startswith("503 5.5.1")


def test_failures_lock_out_then_slow_the_address(world: World) -> None:
    session = world.session("submission")
    session.send("EHLO client.test")
    assert session.send(f"AUTH PLAIN {PLAIN_BAD}").startswith("535 5.7.8")
    assert session.send(f"AUTH PLAIN {PLAIN_BAD}").startswith("535 5.7.8")
    last = session.send(f"AUTH PLAIN {PLAIN_BAD}")
    assert last.startswith("535 5.7.8") and "\r\n421 4.7.0 " in last
    assert session.closed
    # The same address, a new session: each attempt now waits before it is even checked.
    again = world.session("submission")
    again.send("EHLO client.test")
    assert again.send(f"AUTH PLAIN {PLAIN_BAD}") == ""
    world.clock.advance(0.9)
    assert again.read() == ""
    world.clock.advance(0.1)
    assert again.read().startswith("535 5.7.8")
    assert again.send(f"AUTH PLAIN {PLAIN_OK}") == ""  # even the right password waits (no early answer)
    world.clock.advance(1.9)
    assert again.read() == ""
    world.clock.advance(0.1)
    assert again.read().startswith("235 2.7.0")
    # Another address is not slowed.
    other = world.session("submission", source="192.0.2.99")
    other.send("EHLO client.test")
    assert other.send(f"AUTH PLAIN {PLAIN_OK}").startswith("235 2.7.0")


def test_ten_sessions_at_once_with_one_credential_cost_one_password_check(world: World) -> None:
    # A campaign tool's burst: ten sessions send the same AUTH before any check has finished.
    sessions = [world.session("submission", source=f"192.0.2.{n}") for n in range(10)]
    wrong = world.session("submission", source="198.51.100.7")
    for session in sessions + [wrong]:
        session.send("EHLO client.test")
    world.runner.hold = True
    for session in sessions:
        assert session.send(f"AUTH PLAIN {PLAIN_OK}") == ""
    assert wrong.send(f"AUTH PLAIN {PLAIN_BAD}") == ""
    assert world.runner.calls == 2  # one scrypt for the ten, one for the wrong password
    world.runner.release()
    assert [s.read()[:9] for s in sessions] == ["235 2.7.0"] * 10
    assert wrong.read().startswith("535 5.7.8")
    # A later login with the same credential is answered without a check; a wrong one never is.
    world.runner.hold = False
    assert world.session("submission", source="192.0.2.50").send(f"EHLO c\r\nAUTH PLAIN {PLAIN_OK}").endswith(
        "235 2.7.0 Authentication successful\r\n")
    assert world.runner.calls == 2
    for _ in range(2):
        assert wrong.send(f"AUTH PLAIN {PLAIN_BAD}").startswith("535 5.7.8")
    assert world.runner.calls == 4
    # The wrong password's address is slowed as before: its next attempt, even the right one, waits.
    late = world.session("submission", source="198.51.100.7")
    late.send("EHLO client.test")
    assert late.send(f"AUTH PLAIN {PLAIN_OK}") == ""
    world.clock.advance(1.0)
    assert late.read().startswith("235 2.7.0")


def test_pipelined_commands_wait_for_the_password_check(world: World) -> None:
    session = world.session("submissions")
    session.send("EHLO client.test")
    world.runner.hold = True
    session.protocol.dataReceived(f"AUTH PLAIN {PLAIN_OK}\r\nMAIL FROM:<alice@example.test>\r\n".encode())
    assert session.read() == ""  # the check runs elsewhere; MAIL must not be answered before it
    world.runner.release()
    replies = session.read().split("\r\n")
    assert replies[0].startswith("235 2.7.0") and replies[1].startswith("250 2.1.0")


def test_password_never_logged(world: World, logged: list[str]) -> None:
    session = world.session("submission")
    session.send("EHLO client.test")
    session.send("AUTH LOGIN")
    session.send(b64("alice@example.test"))
    session.send(b64("my-secret-typo"))
    session.send(f"AUTH PLAIN {plain('', 'alice@example.test', 'another-secret')}")
    session.send(f"AUTH PLAIN {PLAIN_OK}")
    text = "\n".join(logged)
    assert "auth failed" in text and "auth ok" in text
    for secret in ("my-secret-typo", "another-secret", PASSWORD, PLAIN_OK, b64("my-secret-typo")):
        assert secret not in text


# --- sender ownership and submission fix-ups ------------------------------------


def test_mail_from_must_be_owned(world: World) -> None:
    session = world.session("submission")
    session.login()
    assert session.send("MAIL FROM:<bob@example.test>").startswith("553 5.7.1")
    assert session.send("MAIL FROM:<someone@remote.test>").startswith("553 5.7.1")
    assert session.send("MAIL FROM:<alice+lists@example.test>").startswith("250")
    session.send("RSET")
    assert session.send("MAIL FROM:<team@example.test>").startswith("250")
    session.send("RSET")
    assert session.send("MAIL FROM:<>").startswith("250")


def send_message(session: Session, message: str, sender: str = "alice@example.test") -> str:
    assert session.send(f"MAIL FROM:<{sender}>").startswith("250")
    assert session.send("RCPT TO:<bob@example.test>").startswith("250")
    assert session.send("DATA").startswith("354")
    return session.send(message.replace("\n", "\r\n") + "\r\n.")


@pytest.mark.parametrize(
    "from_header, accepted",
    [
        ("alice@example.test", True),
        ("Alice <alice+x@example.test>", True),
        ("Someone <someone@remote.test>", True),  # not a local domain: not ours to police
        ("Bob <bob@example.test>", False),
        ("alice@example.test, bob@example.test", False),
        ('"alice@example.test" <bob@example.test>', False),
        ("bob@example.test <", False),  # unreadable, but names a local address
    ],
)
def test_from_header_must_be_owned(world: World, from_header: str, accepted: bool) -> None:
    session = world.session("submission")
    session.login()
    reply = send_message(session, f"From: {from_header}\nSubject: x\n\nbody")
    assert reply.startswith("250 2.0.0" if accepted else "553 5.7.1"), reply
    assert len(world.intake.accepted) == (1 if accepted else 0)


@pytest.mark.parametrize(
    "headers, reply",
    [
        # Each got past the owner check when the header section was read with compat32.
        ("Received : x\nFrom: bob@example.test", "553 5.7.1"),  # obsolete syntax, then bob's From:
        ("X-Caf\u00e9: x\nFrom: bob@example.test", "553 5.7.1"),  # a non-ASCII field name first
        ("From : bob@example.test", "553 5.7.1"),
        ("From: bob@example.test.", "553 5.7.1"),
        ("From: alice@example.test\nSender: bob@example.test", "553 5.7.1"),
        ("From: alice@example.test\nResent-From: bob@example.test", "553 5.7.1"),
        ("From: alice@example.test\nResent-Sender: Bob <bob@example.test>", "553 5.7.1"),
        # What cannot be read unambiguously is refused, even when it names only her.
        ("X-Caf\u00e9: x\nFrom: alice@example.test", "550 5.6.0"),
        ("From: alice@example.test\nthis line is no field", "550 5.6.0"),
        ("From: =?utf-8?q?bob=40example.test?=", "550 5.6.0"),
        # Obsolete syntax, a final dot and other case are still her own address.
        ("From : alice@example.test\nSender: Alice <Alice@Example.Test.>", "250 2.0.0"),
    ],
)
def test_header_section_tricks_do_not_get_past_the_owner_check(world: World, headers: str, reply: str) -> None:
    session = world.session("submissions")
    session.login()
    answer = send_message(session, f"{headers}\nSubject: x\n\nbody")
    assert answer.startswith(reply), answer
    assert len(world.intake.accepted) == (1 if reply.startswith("250") else 0)
    # The session goes on: the next message is taken.
    assert send_message(session, "From: alice@example.test\n\nbody").startswith("250 2.0.0")


def test_obsolete_syntax_dkimpy_cannot_read_goes_unsigned_not_refused(tmp_path: Path) -> None:
    generate(tmp_path, "example.test", "s1")
    world = World(tmp_path)
    session = world.session("submission")
    session.login()
    assert send_message(session, "From: alice@example.test\nSubject: plain\n\nbody").startswith("250 2.0.0")
    answer = send_message(session, "Received : from laptop\nFrom: alice@example.test\nSubject: obsolete\n\nbody")
    assert answer.startswith("250 2.0.0"), answer
    [(_, _, _, plain), (_, _, _, obsolete)] = world.intake.accepted
    assert plain.startswith(b"DKIM-Signature: ") and b"DKIM-Signature" not in obsolete


def test_mail_from_outside_is_not_refused_for_its_header_section(world: World) -> None:
    session = world.session("mx", source="192.0.2.50")  # not in relay.networks, not authenticated
    session.send("EHLO client.test")
    answer = send_message(session, "X-Caf\u00e9: x\nFrom: bob@example.test\nno field\n\nbody",
                          sender="someone@remote.test")
    assert answer.startswith("250 2.0.0"), answer
    assert len(world.intake.accepted) == 1


def test_missing_message_id_and_date_are_added_and_received_names_the_user(world: World) -> None:
    session = world.session("submission")
    session.login()
    assert send_message(session, "From: alice@example.test\nSubject: fix me\n\nbody").startswith("250")
    [(copies, _, _, body)] = world.intake.accepted
    headers = body.split(b"\n\n", 1)[0].decode()
    assert headers.startswith("Message-ID: <") and "@mail.example.test>" in headers and "\nDate: " in headers
    received = copies[0].headers.decode()
    assert "with ESMTPSA id" in received and "(authenticated as alice@example.test)" in received
    assert "from client.test ([192.0.2.1])" in received


def test_present_message_id_and_date_are_kept(world: World) -> None:
    session = world.session("submissions")
    session.login()
    message = "Message-ID: <mine@client.test>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nFrom: alice@example.test\n\nbody"
    assert send_message(session, message).startswith("250")
    [(_, _, _, body)] = world.intake.accepted
    assert body.startswith(b"Message-ID: <mine@client.test>\n") and body.count(b"Message-ID:") == 1
    assert body.count(b"Date:") == 1


def test_hide_client_leaves_the_client_out_of_received(tmp_path: Path) -> None:
    world = World(tmp_path, hide_client=True)
    session = world.session("submission")
    session.login()
    assert send_message(session, "From: alice@example.test\n\nbody").startswith("250")
    [(copies, _, _, _)] = world.intake.accepted
    received = copies[0].headers.decode().split("Received: ", 1)[1]
    assert received.startswith("by mail.example.test (mailhost) with ESMTPSA id")
    assert "192.0.2.1" not in received and "client.test" not in received
    assert "(authenticated as alice@example.test)" in received


def test_mx_does_not_fix_up_or_police_senders(world: World) -> None:
    session = world.session("mx")
    session.send("EHLO client.test")
    assert send_message(session, "From: bob@example.test\n\nbody", sender="bob@example.test").startswith("250")
    [(copies, _, _, body)] = world.intake.accepted
    assert body.startswith(b"From: bob@example.test") and b"Message-ID" not in body
    assert "with ESMTP id" in copies[0].headers.decode()
