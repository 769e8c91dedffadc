"""End-to-end fixtures: the real `twistd -n mailhost` on loopback, with a temp config."""

from __future__ import annotations

import functools
import mailbox
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailhost.local.users import UserEntry, hash_password, write_users

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
MAILHOST = str(BIN / "mailhost")


# Ports handed out here come from below the kernel's ephemeral range (32768 and up, where every
# outgoing connection's local port and every bind to port 0 come from), one slice per test runner
# (pytest-xdist's gw0, gw1, ...): a port picked here and bound by a daemon a moment later cannot
# be taken meanwhile by another runner or by a connection.
PORT_BASE = 20000
PORT_SLICE = 1500
_next_port: list[int] = []


def free_port(host: str = "127.0.0.1") -> int:
    if not _next_port:
        runner = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
        _next_port.append(PORT_BASE + (int(runner) % 8 if runner.isdigit() else 0) * PORT_SLICE)
    for _ in range(PORT_SLICE):
        port = _next_port[0]
        start = port - (port - PORT_BASE) % PORT_SLICE
        _next_port[0] = start + (port - start + 1) % PORT_SLICE  # the next one, within this runner's slice
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # in use (a daemon of an earlier test still holds it): the next
            return port
    raise RuntimeError(f"no free port left in {PORT_SLICE} tried")


def wait_for_port(port: int, process: subprocess.Popen, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daemon exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5) as probe:
                # Hang up and wait for the daemon to close too: then it has forgotten this
                # connection, and a test of per-address limits does not meet it.
                probe.shutdown(socket.SHUT_WR)
                try:
                    while probe.recv(4096):
                        pass
                except OSError:
                    pass
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"daemon did not listen on {host}:{port} within {timeout}s")


_DNS: list = []


def _quiet_dns() -> str:
    """A test DNS server with no records (every name: NXDOMAIN at once), shared by
    daemons that name no DNS of their own, so SPF and DMARC lookups end quickly."""
    if not _DNS:
        from tests.support.dns import DNSServer

        _DNS.append(DNSServer([]).start())
    return _DNS[0].nameserver


@pytest.fixture(scope="session", autouse=True)
def _stop_quiet_dns() -> Iterator[None]:
    yield
    for server in _DNS:
        server.stop()


@functools.cache
def _password_hash() -> str:
    return hash_password("s3cret-pass")


DEFAULT_DOMAIN = """
[[domain]]
name = "example.test"
maildir = "mail/example.test"
users = "users"
[domain.aliases]
team = ["alice", "bob"]
both = ["alice", "team"]
support = ["carol@other.test"]
offsite = ["alice", "someone@remote.test"]

[[domain]]
name = "other.test"
maildir = "mail/other.test"
users = "users"
catch_all = "carol"
"""


class Daemon:
    """One mailhost process with its own folder, config, users and log."""

    def __init__(self, root: Path, extra: str = "", limits: str = "", domains: str = DEFAULT_DOMAIN,
                 relay_networks: str = '["127.0.0.1/32", "::1/128"]', prelude: str = "", submission: bool = False,
                 workers: int = 1) -> None:
        self.root = root
        self.port = free_port()
        # submission=True: also a submission (STARTTLS) and a submissions (implicit TLS) listener.
        self.submission_port = free_port() if submission else None
        self.submissions_port = free_port() if submission else None
        submission_listeners = "" if not submission else f"""
[[listener]]
role = "submission"
endpoint = "tcp:{self.submission_port}:interface=127.0.0.1"

[[listener]]
role = "submissions"
endpoint = "tcp:{self.submissions_port}:interface=127.0.0.1"
"""
        self.config = root / "mailhost.toml"
        self.log_path = root / "daemon.log"
        self.config.write_text(
            f"""{prelude}
[server]
hostname = "mail.example.test"
state_dir = "state"
workers = {workers}  # one process unless a test asks: "auto" would double every daemon on a 2-core runner

[[listener]]
role = "mx"
endpoint = "tcp:{self.port}:interface=127.0.0.1"
{submission_listeners}
[limits]
{limits if "greet_pause" in limits else 'greet_pause = "0s"'}
{"" if "greet_pause" in limits else limits}

[relay]
networks = {relay_networks}
{extra if "nameservers" in extra else f'nameservers = ["{_quiet_dns()}"]  # tests never ask a real resolver'}
{"" if "nameservers" in extra else extra}
{domains}
"""
        )
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    def cli(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([MAILHOST, "--config", str(self.config), *args], input=input,
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"mailhost {args} failed: {result.stderr}")
        return result

    def add_user(self, address: str, password: str = "s3cret-pass") -> None:
        """Through the real command, as an administrator would."""
        self.cli("user", "add", address, "--password-stdin", input=password + "\n")

    def seed_users(self, addresses: list[str]) -> None:
        """Write the users file directly (hashing once per test run keeps set-up fast)."""
        write_users(self.root / "users", {a: UserEntry(a, _password_hash()) for a in addresses})

    def start(self, preexec=None) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "mailhost", "--config", str(self.config)],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec,
        )
        log.close()
        for port in (self.port, self.submission_port, self.submissions_port):
            if port is not None:
                wait_for_port(port, self.process)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def maildir(self, user: str, domain: str = "example.test") -> mailbox.Maildir:
        return mailbox.Maildir(self.root / "mail" / domain / user, create=False)

    def messages(self, user: str, domain: str = "example.test") -> list[mailbox.MaildirMessage]:
        path = self.root / "mail" / domain / user
        if not path.exists():
            return []
        return list(self.maildir(user, domain))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator:
    """Build (and afterwards stop) daemons; users alice, bob @example.test and carol @other.test."""
    started: list[Daemon] = []

    def make(start: bool = True, **kwargs) -> Daemon:
        root = tmp_path / f"d{len(started)}"
        root.mkdir()
        daemon = Daemon(root, **kwargs)
        daemon.seed_users(["alice@example.test", "bob@example.test", "carol@other.test"])
        started.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    return make_daemon()


class RawSession:
    """A raw SMTP conversation over a socket, for what smtplib will not send."""

    def __init__(self, port: int, host: str = "127.0.0.1", source: str | None = None, greeting: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source:
            self.sock.bind((source, 0))
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        self.buffer = b""
        if greeting:
            assert self.reply().startswith("220")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """One whole (possibly multi-line) reply, as text."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r} / {self.buffer!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode())
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def command(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 5) -> bool:
        """True when the server closes the connection (after any pending replies)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(daemon) -> Iterator:
    sessions: list[RawSession] = []

    def open_session(**kwargs) -> RawSession:
        session = RawSession(daemon.port, **kwargs)
        sessions.append(session)
        return session

    yield open_session
    for session in sessions:
        session.close()


__all__ = ["Daemon", "RawSession", "free_port", "wait_for_port", "os"]
