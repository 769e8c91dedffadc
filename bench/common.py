"""What the queue benchmarks (outbound.py, queue_scale.py) share: a mailhost
under twistd with a temp config, filling its spool with the Spool class while
it is stopped, the test DNS server, and Postfix's smtp-sink with a counter.

Run with the project's venv Python from the repository root (the benchmarks
import mailhost itself to write the spool).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mailhost.queue.envelope import Envelope, Recipient  # noqa: E402
from mailhost.queue.spool import Spool, new_queue_id  # noqa: E402
from tests.support.postfix import free_port, tail  # noqa: E402

SENDER = "bench@example.test"
MAILHOST_NAME = "mail.example.test"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def stop_process(process: subprocess.Popen, timeout: float = 10, name: str = "") -> bool:
    """SIGTERM to one process we started, SIGKILL if it is still there after `timeout` seconds
    (logged when it has a `name`). True when it had to be killed."""
    if process.poll() is not None:
        return False
    process.terminate()
    try:
        process.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        if name:
            log(f"{name} (pid {process.pid}) ignored SIGTERM for {timeout:g} s; sending SIGKILL")
        process.kill()
        process.wait()
        return True


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP end the benchmark through SystemExit, so its finally: blocks stop what it started."""
    def on_signal(signum: int, _frame) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


# --- messages ---------------------------------------------------------------------


def make_message(number: int, recipient: str, size: int) -> bytes:
    """One message of exactly `size` bytes with CRLF line ends: headers, then body lines of 76 characters."""
    head = (
        f"From: Bench <{SENDER}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: queue benchmark message {number}\r\n"
        f"Date: {formatdate(localtime=True)}\r\n"
        f"Message-ID: <{number}.{time.time_ns()}@example.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    line = (b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789_+/" * 2)[:76] + b"\r\n"
    body = bytearray()
    room = size - len(head)
    while len(body) + len(line) <= room:
        body += line
    rest = room - len(body)
    if rest >= 3:
        body += b"x" * (rest - 2) + b"\r\n"
    return head + bytes(body)


def spool_form(message: bytes, queue_id: str) -> bytes:
    """What mailhost's intake stores for a message it accepted: its Received: line on top, LF line ends."""
    received = (f"Received: from client.example.test ([127.0.0.1])\n\tby {MAILHOST_NAME} (mailhost) with ESMTP "
                f"id {queue_id}; {formatdate(localtime=True)}\n").encode("ascii")
    return received + message.replace(b"\r\n", b"\n")


def fill_spool(spool_dir: Path, count: int, recipient: Callable[[int], str], size: int, next_attempt: float,
               threads: int = 8, progress: bool = True) -> float:
    """Write `count` messages into a stopped mailhost's spool with Spool.store (fsync'd, as the daemon does).

    Each message has one recipient, `recipient(i)`. Returns the seconds it took.
    Threads only overlap the fsyncs; every file is written by the Spool class.
    """
    spool = Spool(spool_dir)
    start = time.monotonic()
    done = 0
    lock = threading.Lock()

    def store(i: int) -> None:
        nonlocal done
        queue_id = new_queue_id()
        rcpt = recipient(i)
        now = time.time()
        envelope = Envelope(queue_id, SENDER, [Recipient(rcpt)], arrival=now, next_attempt=next_attempt,
                            client="client.example.test ([127.0.0.1])")
        spool.store(envelope, [spool_form(make_message(i, rcpt, size), queue_id)])
        with lock:
            done += 1
            if progress and done % 10000 == 0:
                log(f"  {done}/{count} written ({done / (time.monotonic() - start):.0f}/s)")

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(store, range(count)):
            pass
    return time.monotonic() - start


# --- mailhost under twistd -----------------------------------------------------------


def tree_env() -> dict[str, str]:
    """The environment for twistd and the mailhost CLI: this tree's code first.

    The venv's install points at one checkout; PYTHONPATH puts the tree that
    holds this bench/ in front of it (for `mailhost` and twisted/plugins alike),
    so a benchmark run from an exported commit measures that commit.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


MAILHOST_TOML = """\
[server]
hostname = "{hostname}"
state_dir = "{root}/state"
{server_extra}
[[listener]]
role = "mx"
endpoint = "tcp:{port}:interface=127.0.0.1"

[limits]
greet_pause = "0s"

[relay]
networks = ["127.0.0.1/32"]
nameservers = ["{nameserver}"]
mx_port = {mx_port}

[queue]
retry = {retry}
{queue_extra}

[[domain]]
name = "example.test"
maildir = "{root}/mail"
users = "{root}/users"
"""


class Mailhost:
    """`twistd -n mailhost` with a config in `root`; stopped with SIGTERM (SIGKILL after 30 s), by PID."""

    def __init__(self, root: Path, venv_bin: Path, nameserver: str, mx_port: int,
                 retry: Iterable[str] = ("1h",), queue_extra: str = "", profile: Path | None = None,
                 server_extra: str = "") -> None:
        self.root = root
        self.profile = profile
        self.venv_bin = venv_bin
        root.mkdir(parents=True, exist_ok=True)
        (root / "users").touch()
        self.port = free_port("127.0.0.1")
        self.config = root / "mailhost.toml"
        self.config.write_text(MAILHOST_TOML.format(
            hostname=MAILHOST_NAME, root=root, port=self.port, nameserver=nameserver, mx_port=mx_port,
            retry=json.dumps(list(retry)), queue_extra=queue_extra, server_extra=server_extra))
        self.state_dir = root / "state"
        self.spool_dir = self.state_dir / "spool"
        self.log_file = root / "twistd.log"
        self.process: subprocess.Popen | None = None
        self._log_offset = 0

    def start(self) -> float:
        """Start the daemon; returns time.monotonic() just before the exec."""
        out = open(self.log_file, "ab")
        self._log_offset = out.tell()  # wait_for_log looks only at what this run writes
        started = time.monotonic()
        self.process = subprocess.Popen(
            [str(self.venv_bin / "twistd"), "-n", "--pidfile=",
             *(["--profiler=cprofile", "--savestats", f"--profile={self.profile}"] if self.profile else []),
             "mailhost", "--config", str(self.config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root, env=tree_env(),
        )
        out.close()
        return started

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def log_offset(self) -> int:
        """Where this run's lines start in the log file."""
        return self._log_offset

    def wait_for_log(self, pattern: str, timeout: float, poll: float = 0.01) -> re.Match:
        """Poll the log of the current run until `pattern` (a regex) appears; returns its match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        offset = self._log_offset
        text = ""
        while time.monotonic() < deadline:
            try:
                with open(self.log_file, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                chunk = b""
            if chunk:
                offset += len(chunk)
                text += chunk.decode("utf-8", "replace")
                found = regex.search(text)
                if found:
                    return found
                text = text[-4096:]  # keep a tail in case a line was cut
            if not self.alive():
                raise RuntimeError(f"mailhost exited ({self.process.returncode}):\n{tail(self.log_file)}")
            time.sleep(poll)
        raise RuntimeError(f"mailhost's log did not show /{pattern}/ within {timeout}s:\n{tail(self.log_file)}")

    def accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 30, "mailhost")

    def rss_kib(self) -> int:
        """VmRSS of the daemon, from /proc/PID/status."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv_bin / "mailhost"), "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=timeout, check=True, env=tree_env())


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # fields from "state" (3rd) on


def cpu_seconds(pid: int, children: bool = False) -> float:
    """CPU time of a process (utime+stime, all threads), from /proc/PID/stat.

    children=True adds its reaped children (cutime+cstime) and its live
    children's own totals: the whole of a Postfix instance under its master.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    fields = _stat_fields(pid)
    total = sum(int(f) for f in fields[11:13])  # utime, stime
    if children:
        total += sum(int(f) for f in fields[13:15])  # cutime, cstime
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                child = _stat_fields(int(entry.name))
            except (OSError, ValueError):
                continue
            if int(child[1]) == pid:
                total += sum(int(f) for f in child[11:15])
    return total / ticks


def spool_size(spool_dir: Path) -> int:
    """Committed messages: envelope files under env/."""
    return sum(1 for _ in Spool(spool_dir).ids())


# --- the test DNS server ----------------------------------------------------------------


class ZoneServer:
    """tests/support/dns_server.py (the server behind tests/support/dns.py's DNSServer)
    on a chosen address and port, with a real TTL.

    DNSServer always picks a free port; the benchmark needs port 53 as well, for
    Postfix, whose libc resolver cannot be told another port.
    """

    def __init__(self, folder: Path, records: list[list[str]], address: str, port: int, ttl: int = 300) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.zone = folder / "zone.json"
        self.zone.write_text(json.dumps({"records": records, "ttl": ttl}))
        self.address = address
        self.stderr_path = folder / "dns-stderr.log"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.dns_server", "--listen", f"{address}:{port}",
                 "--zone", str(self.zone)],
                cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(20)
        if not line or not line[0].startswith("ready"):
            self.stop()
            raise RuntimeError(f"DNS server on {address}:{port} did not start: "
                               f"{self.stderr_path.read_text(errors='replace').strip()[-500:]}")
        self.port = int(line[0].split()[1])

    @property
    def nameserver(self) -> str:
        return f"{self.address}:{self.port}"

    def stop(self) -> None:
        stop_process(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


# --- smtp-sink --------------------------------------------------------------------------


class SmtpSink:
    """Postfix's smtp-sink(1) on address:port, throwing mail away and counting it.

    `-c` prints "sess=N quit=N mesg=N" (CR-terminated, unbuffered) each time a
    session ends or a "." is received; `messages` is the last mesg= seen.
    `dump_template` (smtp-sink's -d, run as nobody) also writes each message to a file.
    """

    COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")
    # The counter is read at most this often: read at every update (a thousand a second)
    # this harness used 6-11% of a core during a drain, taken from whichever MTA was using
    # the whole machine. Drain times end up to this much late, the same for both MTAs.
    READ_EVERY = 0.01

    def __init__(self, address: str, port: int, backlog: int = 1024, max_connections: int = 512,
                 dump_template: str | None = None) -> None:
        self.address = address
        self.port = port
        self.messages = 0
        self.sessions = 0
        self.changed = time.monotonic()
        self._cond = threading.Condition()
        # -u: smtp-sink refuses to run as root without a user to switch to.
        self.process = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", "-c", "-m", str(max_connections),
             # -d: every message also to a file of its own, for checks after the run
             *(["-d", dump_template] if dump_template else []), f"{address}:{port}", str(backlog)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"smtp-sink exited at once ({self.process.returncode})")
            try:
                with socket.create_connection((address, port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"smtp-sink did not listen on {address}:{port}")

    def _read(self) -> None:
        buffer = b""
        stream = self.process.stdout
        while True:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *done, buffer = re.split(rb"[\r\n]", buffer)
            for record in reversed(done):
                found = self.COUNTERS.search(record)
                if found:
                    with self._cond:
                        self.sessions = int(found.group(1))
                        if int(found.group(3)) != self.messages:
                            self.messages = int(found.group(3))
                            self.changed = time.monotonic()
                        self._cond.notify_all()
                    break
            time.sleep(self.READ_EVERY)

    def wait_for(self, target: int, since: float, stall_timeout: float) -> float | None:
        """Block until `messages` >= target; returns the moment the counter got there
        (monotonic), or None once the count has not moved for `stall_timeout`
        seconds (counting from `since` at the latest)."""
        with self._cond:
            while self.messages < target:
                if time.monotonic() - max(self.changed, since) > stall_timeout:
                    return None
                self._cond.wait(0.5)
            return self.changed

    def stop(self) -> None:
        stop_process(self.process)


# --- a disk in its usual state ----------------------------------------------------

# Creating, writing and closing a 4 KiB file costs 35-60 us of CPU here on a quiet
# disk, and 300-1,200 us after many files were deleted (see wait_for_quiet_disk).
CREATE_PROBE_FILES = 100
CREATE_SLOW_MICROSECONDS = 90.0


def file_creation_microseconds(folder: Path, count: int = CREATE_PROBE_FILES) -> float:
    """CPU microseconds to create, write and close one small file in `folder`, on average.
    The files stay (deleting them would add to what the next probe measures)."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.process_time()
    for _ in range(count):
        fd = os.open(folder / f"{time.time_ns()}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"x" * 4096)
        os.close(fd)
    return (time.process_time() - start) / count * 1e6


def wait_for_quiet_disk(folder: Path, limit: float = 480.0, every: float = 30.0) -> float:
    """Wait (up to `limit` seconds) until creating a file in `folder` costs what it does on a quiet disk.

    On ext4 without a journal (this VM's root filesystem), every new inode is found by
    stepping past each inode of its block group freed in the last minute, or the last six
    while the inode table block is dirty (ext4's find_inode_bit and recently_deleted).
    Right after a mass deletion, such as the previous benchmark's cleanup, every Maildir
    or queue file costs several times more to create, and only the server that runs then
    pays: 17% of all CPU went there in one inbound run. Journalled filesystems skip the check.
    Returns the last cost measured (us per file).
    """
    deadline = time.monotonic() + limit
    while True:
        cost = file_creation_microseconds(folder)
        if cost < CREATE_SLOW_MICROSECONDS:
            log(f"disk is quiet: a file costs {cost:.0f} us to create")
            return cost
        if time.monotonic() > deadline:
            log(f"disk still slow after {limit:.0f}s ({cost:.0f} us to create a file); measuring anyway")
            return cost
        log(f"creating a file costs {cost:.0f} us (many files were deleted recently); waiting {every:.0f}s")
        time.sleep(every)


def write_json(path: Path, figures: dict) -> None:
    """A benchmark's figures for bench/targets.py, which runs them all and prints one table."""
    Path(path).write_text(json.dumps(figures, indent=1))
