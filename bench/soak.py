"""Soak: normal mail at a steady rate while hostile clients attack the daemon.

    .venv/bin/python bench/soak.py [--minutes 2] [--rate 5] [--max-rss-mib 256]

Starts its own `twistd -n mailhost` (this tree's code) on free loopback ports
(an mx and a submissions listener), with a test DNS server, and for the given
minutes runs at once:

* normal senders: smtplib from the relay network (127.0.0.1) to a local user,
  `--rate` new connections and messages a second; a transient failure is
  retried, as an MTA would, up to 5 times;
* silent TLS: `--silent-tls` sockets to the submissions port (implicit TLS)
  from 127.0.0.2 that never start the handshake; one closed by the daemon is
  replaced (the attacker keeps up the pressure);
* a pipeline flood: one client from 127.0.0.4 writes `--flood-mib` MiB of
  `EHLO x` after the greeting and never reads a reply;
* slowloris: `--slowloris` sockets from 127.0.1.x (10 per address) sending
  `NOOP\\r\\n` one byte every `--byte-every` seconds, replaced when closed;
* a connection flood: every `--wave-every` seconds, `--wave-size` connections
  at once from 127.0.0.5; the ones that get 220 are held until the next wave.

Then it checks that every normal message is in the Maildir, that the peak
resident memory of the daemon and its workers (VmRSS, sampled every second)
stayed under `--max-rss-mib`, and that no silent TLS connection was left
open longer than `--hold-limit` seconds (DESIGN.md: a TLS handshake that
never comes is aborted). It prints a table of figures and exits 1 with the
reasons when a check fails (2 when the daemon could not be started).

Every loop is bounded in count and time, every socket goes to 127.0.0.0/8,
and everything started here is stopped here, by PID.
"""

from __future__ import annotations

import argparse
import errno
import os
import queue
import re
import resource
import select
import selectors
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stop_process, tree_env  # noqa: E402

from tests.support.dns import DNSServer  # noqa: E402
from tests.support.postfix import free_port, tail  # noqa: E402

VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"  # where the daemon listens
NORMAL_FROM = "127.0.0.1"  # the relay network
SILENT_TLS_FROM = "127.0.0.2"
FLOOD_FROM = "127.0.0.4"
WAVES_FROM = "127.0.0.5"
SLOWLORIS_PER_ADDRESS = 10
HOSTNAME = "mail.example.test"
RECIPIENT = "alice@example.test"

CONFIG = """\
[server]
hostname = "{hostname}"
state_dir = "{root}/state"
{server_extra}

[[listener]]
role = "mx"
endpoint = "tcp:{mx_port}:interface={host}"

[[listener]]
role = "submissions"
endpoint = "tcp:{submissions_port}:interface={host}"

[limits]
greet_pause = "0s"
command_timeout = {command_timeout}
{limits_extra}

[relay]
networks = ["{normal}/32"]
nameservers = ["{nameserver}"]

[metrics]
endpoint = "tcp:{metrics_port}:interface={host}"

[[domain]]
name = "example.test"
maildir = "{root}/mail"
users = "{root}/users"
"""


def say(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


def reply_kind(line: bytes) -> str:
    """A reply line as a category for the table: the hostname taken out, the text cut short."""
    text = line.decode("utf-8", "replace").strip().replace(HOSTNAME, "").replace("  ", " ")
    return text[:60] or "(empty line)"


def connect(source: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A blocking connect from `source` (an address of 127.0.0.0/8) to the daemon."""
    assert source.startswith("127.")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


def error_name(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno:
        return errno.errorcode.get(error.errno, str(error.errno))
    return type(error).__name__


# --- the daemon and its memory ------------------------------------------------------------


class Daemon:
    """`twistd -n mailhost` with this tree's code, its RLIMIT_NOFILE set to `nofile`."""

    def __init__(self, root: Path, args: argparse.Namespace, nameserver: str) -> None:
        self.root = root
        self.mx_port = free_port(HOST)
        self.submissions_port = free_port(HOST)
        self.metrics_port = free_port(HOST)
        self.config = root / "mailhost.toml"
        self.log_path = root / "twistd.log"
        self.maildir = root / "mail" / RECIPIENT.split("@")[0]
        self.nofile = args.daemon_nofile
        self.config.write_text(CONFIG.format(
            hostname=HOSTNAME, root=root, host=HOST, normal=NORMAL_FROM, nameserver=nameserver,
            mx_port=self.mx_port, submissions_port=self.submissions_port, metrics_port=self.metrics_port,
            command_timeout=args.command_timeout,
            server_extra=f"workers = {args.workers}" if args.workers else "",
            limits_extra="\n".join(args.limit)))
        (root / "users").touch()
        self.process: subprocess.Popen | None = None
        self.killed = False

    def cli(self, *args: str, input: str | None = None) -> None:
        result = subprocess.run([str(VENV_BIN / "mailhost"), "--config", str(self.config), *args], input=input,
                                capture_output=True, text=True, timeout=60, env=tree_env())
        if result.returncode != 0:
            raise RuntimeError(f"mailhost {' '.join(args)}: {result.stderr.strip()}")

    def start(self) -> None:
        def limit_fds() -> None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(self.nofile, hard), hard))

        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "mailhost", "--config", str(self.config)],
                cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=tree_env(),
                preexec_fn=limit_fds)
        for port in (self.mx_port, self.submissions_port):
            self._wait_for_port(port)

    def _wait_for_port(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mailhost exited ({self.process.returncode}):\n{tail(self.log_path)}")
            try:
                with connect(NORMAL_FROM, port, 1.0):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"mailhost did not listen on {HOST}:{port} within {timeout:.0f} s:\n{tail(self.log_path)}")

    def pids(self) -> list[int]:
        """The daemon and its worker processes (its children)."""
        if self.process is None or self.process.poll() is not None:
            return []
        pid = self.process.pid
        found = [pid]
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                except OSError:
                    continue
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                    found.append(int(entry.name))
        return found

    def stop(self) -> None:
        if self.process is not None and stop_process(self.process, 30, "mailhost"):
            self.killed = True

    def delivered(self) -> list[int]:
        """The soak numbers of the messages in the recipient's Maildir (new/ and cur/)."""
        numbers = []
        for folder in ("new", "cur"):
            path = self.maildir / folder
            if not path.is_dir():
                continue
            for entry in os.scandir(path):
                with open(entry.path, "rb") as f:
                    head = f.read(4096)
                found = re.search(rb"^Subject: soak (\d+)", head, re.MULTILINE)
                if found:
                    numbers.append(int(found.group(1)))
        return numbers

    def metrics(self) -> list[str]:
        """The SMTP counters the daemon exports (whatever limits it counts)."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=10) as response:
                text = response.read().decode("utf-8", "replace")
        except OSError as error:
            return [f"(metrics not read: {error})"]
        return [line for line in text.splitlines()
                if line.startswith("mailhost_smtp_") and "_created" not in line and not line.endswith(" 0.0")]


def status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Sampler:
    """VmRSS and open files of the daemon and its workers, every second."""

    daemon: Daemon
    ceiling_kib: int
    over_ceiling: threading.Event
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, rss KiB, fds, processes)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> tuple[int, int, int]:
        pids = self.daemon.pids()
        return sum(status_kib(pid, "VmRSS") for pid in pids), sum(open_fds(pid) for pid in pids), len(pids)

    def run(self, started: float) -> None:
        while not self._stop.wait(1.0):
            rss, fds, processes = self.sample()
            self.samples.append((time.monotonic() - started, rss, fds, processes))
            if rss > self.ceiling_kib:
                self.over_ceiling.set()

    def stop(self) -> None:
        self._stop.set()


# --- normal senders ---------------------------------------------------------------------


@dataclass
class NormalStats:
    scheduled: int = 0
    accepted: int = 0
    failed: int = 0
    retries: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def message(number: int) -> bytes:
    return (f"From: <soak@client.example.test>\r\nTo: <{RECIPIENT}>\r\nSubject: soak {number}\r\n"
            f"Date: {formatdate(localtime=True)}\r\nMessage-ID: {make_msgid(domain='client.example.test')}\r\n"
            f"\r\nsoak message {number}\r\n" + "a line of text to make it a little longer\r\n" * 20).encode()


def send_normal(port: int, number: int, stats: NormalStats, attempts: int = 5) -> None:
    """One message as an MTA sends it: a new connection, retried after a transient failure."""
    started = time.monotonic()
    for attempt in range(attempts):
        try:
            with smtplib.SMTP(HOST, port, local_hostname="client.example.test", timeout=20,
                              source_address=(NORMAL_FROM, 0)) as client:
                client.sendmail("soak@client.example.test", [RECIPIENT], message(number))
            with stats.lock:
                stats.accepted += 1
                stats.retries += attempt
                stats.latencies.append(time.monotonic() - started)
            return
        except smtplib.SMTPResponseException as error:
            kind = f"{error.smtp_code} {reply_kind(error.smtp_error)}"
            permanent = error.smtp_code >= 500
        except (smtplib.SMTPException, OSError) as error:
            kind, permanent = error_name(error), False
        with stats.lock:
            stats.errors[kind] += 1
        if permanent:
            break
        time.sleep(min(2 ** attempt, 10))
    with stats.lock:
        stats.failed += 1


def run_normal(port: int, rate: float, seconds: float, stats: NormalStats, threads: int = 16) -> list[threading.Thread]:
    """Schedule rate*seconds messages at a steady pace on `threads` daemon threads; returns the threads."""
    total = int(rate * seconds)
    work: queue.Queue[int | None] = queue.Queue()

    def worker() -> None:
        while (number := work.get()) is not None:
            send_normal(port, number, stats)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for thread in workers:
        thread.start()
    start = time.monotonic()
    for number in range(total):
        delay = start + number / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        work.put(number)
        stats.scheduled += 1
    for _ in workers:
        work.put(None)
    return workers


# --- hostile clients ----------------------------------------------------------------------


@dataclass
class HeldSockets:
    """Hostile sockets kept open, replaced when the daemon closes one, until `until`."""

    name: str
    count: int
    max_opens: int
    opened: int = 0
    bytes_sent: int = 0
    connect_errors: Counter = field(default_factory=Counter)
    closed_by_daemon: int = 0
    lifetimes: list[float] = field(default_factory=list)  # of those the daemon closed
    replies: Counter = field(default_factory=Counter)  # last reply line before the daemon closed
    open_at_end: int = 0
    oldest_at_end: float = 0.0


def run_silent_tls(port: int, stats: HeldSockets, until: float) -> None:
    """Connect to the implicit-TLS port and never send a ClientHello."""
    selector = selectors.DefaultSelector()
    opened_at: dict[socket.socket, float] = {}
    try:
        while time.monotonic() < until:
            while len(opened_at) < stats.count and stats.opened < stats.max_opens and time.monotonic() < until:
                try:
                    sock = connect(SILENT_TLS_FROM, port)
                except OSError as error:
                    stats.connect_errors[error_name(error)] += 1
                    time.sleep(0.5)
                    break
                stats.opened += 1
                sock.setblocking(False)
                opened_at[sock] = time.monotonic()
                selector.register(sock, selectors.EVENT_READ)
            for key, _ in selector.select(timeout=0.5):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    stats.replies["bytes before any handshake"] += 1
                    continue
                stats.closed_by_daemon += 1
                stats.lifetimes.append(time.monotonic() - opened_at.pop(sock))
                selector.unregister(sock)
                sock.close()
    finally:
        now = time.monotonic()
        stats.open_at_end = len(opened_at)
        stats.oldest_at_end = max((now - t for t in opened_at.values()), default=0.0)
        for sock in opened_at:
            sock.close()
        selector.close()


PATTERN = b"NOOP\r\n"


def run_slowloris(port: int, stats: HeldSockets, every: float, until: float) -> None:
    """Many sessions, each sending NOOP one byte every `every` seconds (after the greeting)."""
    addresses = [f"127.0.1.{1 + i // SLOWLORIS_PER_ADDRESS}" for i in range(stats.count)]
    selector = selectors.DefaultSelector()
    # per socket: [slot, opened at, greeted, bytes sent, next send time, last reply line, partial line]
    state: dict[socket.socket, list] = {}
    free_slots = list(range(stats.count))
    try:
        while time.monotonic() < until:
            while free_slots and stats.opened < stats.max_opens and time.monotonic() < until:
                slot = free_slots.pop()
                try:
                    sock = connect(addresses[slot], port)
                except OSError as error:
                    stats.connect_errors[error_name(error)] += 1
                    free_slots.append(slot)
                    time.sleep(0.5)
                    break
                stats.opened += 1
                sock.setblocking(False)
                now = time.monotonic()
                # Spread the bytes of all sockets over the interval.
                state[sock] = [slot, now, False, 0, now + every * (slot / stats.count), b"", b""]
                selector.register(sock, selectors.EVENT_READ)
            now = time.monotonic()
            closed: list[socket.socket] = []
            for sock, s in state.items():
                if s[2] and s[4] <= now:
                    try:
                        sock.send(PATTERN[s[3] % len(PATTERN):][:1])
                        s[3] += 1
                        stats.bytes_sent += 1
                        s[4] = now + every
                    except OSError:
                        closed.append(sock)
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                if sock in closed:
                    continue
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    closed.append(sock)
                    continue
                s = state[sock]
                lines = (s[6] + data).split(b"\r\n")
                s[6] = lines.pop()[-512:]
                if lines:
                    s[5] = lines[-1][:200]
                    s[2] = s[2] or lines[0].startswith(b"220")
            for sock in closed:
                s = state.pop(sock)
                selector.unregister(sock)
                sock.close()
                stats.closed_by_daemon += 1
                stats.lifetimes.append(time.monotonic() - s[1])
                stats.replies[reply_kind(s[5]) if s[5] else "(closed without a reply)"] += 1
                free_slots.append(s[0])
    finally:
        now = time.monotonic()
        stats.open_at_end = len(state)
        stats.oldest_at_end = max((now - s[1] for s in state.values()), default=0.0)
        for sock in state:
            sock.close()
        selector.close()


@dataclass
class FloodStats:
    target: int
    written: int = 0
    greeting: str = ""
    outcome: str = "not started"
    stalled_for: float = 0.0
    closed_by_daemon: bool = False


def run_pipeline_flood(port: int, stats: FloodStats, stall_limit: float, until: float, over_ceiling: threading.Event) -> None:
    """Write `target` bytes of EHLO x after the greeting, never read; stop once the
    daemon stops reading us for `stall_limit` seconds (backpressure works)."""
    chunk = b"EHLO x\r\n" * 8192  # 64 KiB
    try:
        sock = connect(FLOOD_FROM, port, timeout=10)
    except OSError as error:
        stats.outcome = f"connect failed: {error_name(error)}"
        return
    try:
        greeting = b""
        while b"\r\n" not in greeting and len(greeting) < 4096:
            data = sock.recv(4096)  # the only read: talking before the greeting would be refused
            if not data:
                break
            greeting += data
        stats.greeting = reply_kind(greeting.split(b"\r\n")[0])
        sock.setblocking(False)
        stats.outcome = "wrote everything (nothing stopped it)"
        stalled_since: float | None = None
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        while stats.written < stats.target:
            now = time.monotonic()
            if now >= until:
                stats.outcome = "run ended while writing"
                break
            if over_ceiling.is_set():
                stats.outcome = "stopped: daemon memory over the safety ceiling"
                break
            try:
                sent = sock.send(memoryview(chunk)[: stats.target - stats.written])
            except BlockingIOError:
                sent = 0
            except OSError as error:
                stats.outcome = f"daemon closed the connection ({error_name(error)})"
                stats.closed_by_daemon = True
                break
            if sent:
                stats.written += sent
                stalled_since = None
                continue
            stalled_since = stalled_since or now
            stats.stalled_for = now - stalled_since
            if stats.stalled_for >= stall_limit:
                stats.outcome = f"blocked: the daemon stopped reading for {stall_limit:.0f} s"
                break
            poller.poll(1000)
        # Hold the connection (still never reading) until the end, unless told to let go.
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        while not stats.closed_by_daemon and time.monotonic() < until and not over_ceiling.is_set():
            if poller.poll(500):
                stats.closed_by_daemon = True
    finally:
        sock.close()


@dataclass
class WaveStats:
    waves: int = 0
    connections: int = 0
    outcomes: Counter = field(default_factory=Counter)


def run_waves(port: int, stats: WaveStats, size: int, every: float, until: float) -> None:
    """Every `every` seconds, `size` connections at once from one address; read each one's
    first reply line (within 10 s); hold the greeted ones until the next wave."""
    held: list[socket.socket] = []
    try:
        while time.monotonic() < until:
            wave_start = time.monotonic()
            for sock in held:
                sock.close()
            held = []
            stats.waves += 1
            pending: dict[socket.socket, bytes] = {}
            selector = selectors.DefaultSelector()
            for _ in range(size):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind((WAVES_FROM, 0))
                sock.setblocking(False)
                result = sock.connect_ex((HOST, port))
                stats.connections += 1
                if result not in (0, errno.EINPROGRESS):
                    stats.outcomes[f"connect failed: {errno.errorcode.get(result, result)}"] += 1
                    sock.close()
                    continue
                pending[sock] = b""
                selector.register(sock, selectors.EVENT_READ)
            read_until = min(wave_start + 10, until + 10)
            while pending and time.monotonic() < read_until:
                for key, _ in selector.select(timeout=0.5):
                    sock = key.fileobj
                    try:
                        data = sock.recv(1024)
                    except BlockingIOError:
                        continue
                    except OSError as error:
                        outcome, data = f"reset ({error_name(error)})", None
                    else:
                        outcome = None
                    if data:
                        pending[sock] += data
                        if b"\r\n" not in pending[sock] and len(pending[sock]) < 1024:
                            continue
                        line = pending[sock].split(b"\r\n")[0]
                        outcome = "220 (held until the next wave)" if line.startswith(b"220") else reply_kind(line)
                    elif data is not None:
                        outcome = "closed without a reply"
                    stats.outcomes[outcome] += 1
                    selector.unregister(sock)
                    del pending[sock]
                    if outcome.startswith("220"):
                        held.append(sock)
                    else:
                        sock.close()
            for sock in pending:
                stats.outcomes["no reply within 10 s"] += 1
                sock.close()
            selector.close()
            pause = wave_start + every - time.monotonic()
            if pause > 0 and time.monotonic() + pause < until:
                time.sleep(pause)
            elif pause > 0:
                break
    finally:
        for sock in held:
            sock.close()


# --- the run ------------------------------------------------------------------------------


def mib(kib: float) -> str:
    return f"{kib / 1024:.0f} MiB"


def lifetimes(values: list[float]) -> str:
    if not values:
        return ""
    return f", lived median {statistics.median(values):.1f} s, max {max(values):.1f} s"


def counted(counter: Counter) -> str:
    return "; ".join(f"{kind}: {n}" for kind, n in counter.most_common())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="how long the load runs (default 2)")
    parser.add_argument("--rate", type=float, default=5.0, help="normal messages a second (default 5)")
    parser.add_argument("--max-rss-mib", type=int, default=256,
                        help="bound on the daemon's peak VmRSS, workers included (default 256)")
    parser.add_argument("--rss-ceiling-mib", type=int, default=1536,
                        help="safety: past this the flood stops, to spare the machine (default 1536)")
    parser.add_argument("--hold-limit", type=float, default=60.0,
                        help="a silent TLS connection open longer than this fails the run (default 60 s)")
    parser.add_argument("--silent-tls", type=int, default=200, help="silent sockets on the submissions port")
    parser.add_argument("--slowloris", type=int, default=100, help="slowloris sockets (10 per source address)")
    parser.add_argument("--byte-every", type=float, default=5.0, help="slowloris: seconds between bytes")
    parser.add_argument("--flood-mib", type=float, default=40.0, help="pipeline flood: MiB of EHLO x to write")
    parser.add_argument("--wave-size", type=int, default=300, help="connection flood: connections per wave")
    parser.add_argument("--wave-every", type=float, default=10.0, help="connection flood: seconds between waves")
    parser.add_argument("--command-timeout", type=int, default=20, help="[limits] command_timeout (default 20)")
    parser.add_argument("--limit", action="append", default=[], metavar="'KEY = VALUE'",
                        help="an extra line for [limits], e.g. 'connections = 500' (repeatable)")
    parser.add_argument("--workers", help="[server] workers (default: the config's default)")
    parser.add_argument("--daemon-nofile", type=int, default=1024, help="the daemon's open-file limit (default 1024)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (config, log, Maildir)")
    args = parser.parse_args()

    seconds = args.minutes * 60
    hostile_sockets = args.silent_tls + args.slowloris + args.wave_size * 2 + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hostile_sockets + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, hostile_sockets + 256), hard))

    root = Path(tempfile.mkdtemp(prefix="mailhost-soak-"))
    dns = DNSServer([])  # no records: every lookup is NXDOMAIN at once
    daemon: Daemon | None = None
    try:
        dns.start()
        daemon = Daemon(root, args, dns.nameserver)
        try:
            daemon.cli("user", "add", RECIPIENT, "--password-stdin", input="soak-password\n")
            daemon.start()
        except RuntimeError as error:
            say(f"could not start mailhost: {error}\n(config and log kept in {root})")
            return 2
        over_ceiling = threading.Event()
        sampler = Sampler(daemon, args.rss_ceiling_mib * 1024, over_ceiling)
        time.sleep(2)
        idle_rss, idle_fds, processes = sampler.sample()
        say(f"mailhost pid {daemon.process.pid} ({processes} process(es)): {mib(idle_rss)} idle, {idle_fds} files; "
            f"load for {seconds:.0f} s")

        started = time.monotonic()
        until = started + seconds
        threading.Thread(target=sampler.run, args=(started,), daemon=True).start()
        normal = NormalStats()
        silent = HeldSockets("silent TLS", args.silent_tls, args.silent_tls * 20)
        slow = HeldSockets("slowloris", args.slowloris, args.slowloris * 20)
        flood = FloodStats(int(args.flood_mib * 1024 * 1024))
        waves = WaveStats()
        hostile = [
            threading.Thread(target=run_silent_tls, args=(daemon.submissions_port, silent, until), daemon=True),
            threading.Thread(target=run_slowloris, args=(daemon.mx_port, slow, args.byte_every, until), daemon=True),
            threading.Thread(target=run_pipeline_flood, args=(daemon.mx_port, flood, 15.0, until, over_ceiling),
                             daemon=True),
            threading.Thread(target=run_waves, args=(daemon.mx_port, waves, args.wave_size, args.wave_every, until),
                             daemon=True),
        ]
        for thread in hostile:
            thread.start()
        senders = run_normal(daemon.mx_port, args.rate, seconds, normal)
        for thread in hostile:
            thread.join(timeout=max(0.0, until - time.monotonic()) + 30)
        say("load over; waiting for the last normal messages")
        # A sender retries at most 5 times (20 s socket timeouts, <= 10 s pauses): bounded.
        finish_by = time.monotonic() + 300
        for thread in senders:
            thread.join(timeout=max(0.0, finish_by - time.monotonic()))
        unfinished = normal.scheduled - normal.accepted - normal.failed
        time.sleep(3)  # hostile sockets are closed: let the daemon let go of them
        final_rss, final_fds, _ = sampler.sample()
        sampler.stop()
        counters = daemon.metrics()
        delivered = daemon.delivered()
    finally:
        if daemon is not None:
            daemon.stop()
        dns.stop()

    peak = max(sampler.samples, key=lambda s: s[1], default=(0, idle_rss, idle_fds, processes))
    peak_fds = max((s[2] for s in sampler.samples), default=idle_fds)
    missing = sorted(set(range(normal.scheduled)) - set(delivered))
    duplicates = len(delivered) - len(set(delivered))

    rows = [
        ("normal mail", f"{normal.scheduled} sent at {args.rate:g}/s, {normal.accepted} accepted (250), "
                        f"{len(set(delivered))} in the Maildir, {normal.failed} given up, {unfinished} unfinished, "
                        f"{normal.retries} retries" + (f", {duplicates} duplicates" if duplicates else "")),
        ("  latency", f"median {statistics.median(normal.latencies):.2f} s, max {max(normal.latencies):.2f} s"
                      if normal.latencies else "(none accepted)"),
        ("  errors seen", counted(normal.errors) or "none"),
        ("daemon RSS", f"idle {mib(idle_rss)}, peak {mib(peak[1])} at {peak[0]:.0f} s, final {mib(final_rss)}; "
                       f"bound {args.max_rss_mib} MiB; {peak[3]} process(es)"),
        ("daemon files", f"idle {idle_fds}, peak {peak_fds}, final {final_fds} (limit {args.daemon_nofile})"),
        ("silent TLS", f"{args.silent_tls} kept open: {silent.opened} opened, {silent.closed_by_daemon} closed by the "
                       f"daemon{lifetimes(silent.lifetimes)}; {silent.open_at_end} open at the end "
                       f"(oldest {silent.oldest_at_end:.0f} s)"
                       + (f"; connect errors: {counted(silent.connect_errors)}" if silent.connect_errors else "")
                       + (f"; {counted(silent.replies)}" if silent.replies else "")),
        ("pipeline flood", f"wrote {flood.written / 2**20:.1f} of {flood.target / 2**20:.0f} MiB; {flood.outcome}; "
                           f"closed by the daemon: {'yes' if flood.closed_by_daemon else 'no'}"),
        ("slowloris", f"{args.slowloris} kept open, a byte every {args.byte_every:g} s: {slow.opened} opened, "
                      f"{slow.bytes_sent} bytes sent, {slow.closed_by_daemon} closed by the daemon{lifetimes(slow.lifetimes)}; "
                      f"{slow.open_at_end} open at the end (oldest {slow.oldest_at_end:.0f} s)"
                      + (f"; connect errors: {counted(slow.connect_errors)}" if slow.connect_errors else "")),
        ("  last replies", counted(slow.replies) or "none"),
        ("connection flood", f"{waves.waves} waves of {args.wave_size} from {WAVES_FROM}: {waves.connections} connections"),
        ("  first replies", counted(waves.outcomes) or "none"),
        ("daemon counters", "; ".join(counters) or "none"),
    ]
    if daemon is not None and daemon.killed:
        rows.append(("stop", "the daemon needed SIGKILL (no exit within 30 s of SIGTERM)"))
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")

    failures = []
    if missing or normal.failed or unfinished:
        failures.append(f"{len(missing)} of {normal.scheduled} normal messages are not in the Maildir"
                        + (f" (e.g. numbers {missing[:5]})" if missing else ""))
    if peak[1] > args.max_rss_mib * 1024:
        failures.append(f"the daemon's peak RSS {mib(peak[1])} is over the bound of {args.max_rss_mib} MiB")
    if silent.oldest_at_end > args.hold_limit:
        failures.append(f"{silent.open_at_end} silent TLS connections were still open at the end, the oldest after "
                        f"{silent.oldest_at_end:.0f} s (> {args.hold_limit:g} s): no handshake timeout")
    print()
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    if failures:
        for reason in failures:
            print(f"FAIL: {reason}")
        return 1
    print("PASS: every normal message delivered, memory within the bound, no silent TLS connection held")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
