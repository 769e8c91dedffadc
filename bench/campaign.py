#!/usr/bin/env python3
"""Campaign benchmark: the whole path a newsletter takes, mailhost against Postfix + OpenDKIM.

A campaign tool (this script: one process per connection, 10 connections)
submits on a submission port with STARTTLS and AUTH PLAIN, ~4 KiB newsletters
from news@example.test to user<i>@d<i mod 100>.test. The server DKIM-signs
them (RSA-2048, relaxed/relaxed), queues them and delivers each by MX: every
d<n>.test has its own MX host, served by the test DNS server on 127.0.0.153:53,
pointing at one of four smtp-sink(1) processes on 127.0.0.21-24. Both sides
get the same client, DNS, sinks and key, one after the other, never at once:

* mailhost: `twistd -n mailhost` with a submission listener, the key in
  state_dir/dkim/ (as `mailhost dkim keygen` puts it), `--workers N` or the
  config's default.
* Postfix 3.7: a private instance whose smtpd is a submission service
  (STARTTLS required, Cyrus SASL with a private sasldb), OpenDKIM as its milter
  over a unix socket, and its smtp client resolving each MX through the test DNS.

Timed from the moment the connections open until the sinks counted every
message; then every message is checked to have arrived exactly once, and its
DKIM signature verified with dkimpy (all, or --dkim-sample of them).

Run from the repository root, as root (see bench/README.md):

    .venv/bin/python bench/campaign.py [--messages 10000] [--runs 3] [--workers 1 --workers 2] [--stagger 0.1]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pwd
import random
import re
import shutil
import signal
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO, Mailhost, SmtpSink, ZoneServer, exit_on_signals, log, stop_process, tree_env, wait_for_quiet_disk, write_json,
)
from tests.support.postfix import MAIL_OWNER, Postfix, PostfixError, free_port, tail, unavailable  # noqa: E402

DOMAIN = "example.test"  # the sender's domain: the one both sides sign for
SELECTOR = "bench"
USER = f"news@{DOMAIN}"
PASSWORD = "campaign-bench-password"
DNS_ADDRESS = "127.0.0.153"  # port 53: Postfix's libc resolver cannot use another
SINK_ADDRESSES = tuple(f"127.0.0.{21 + n}" for n in range(4))
CLIENT_ADDRESS = "127.0.1.{}"  # connection k comes from 127.0.1.(k+1): the log then says who took it
SINK_HEADERS = re.compile(rb"\A(?:X-(?:Client-Addr|Client-Proto|Helo-Args|Mail-Args|Rcpt-Args): [^\n]*\n)+")
SEQUENCE = re.compile(rb"^X-Campaign-Seq: (\d+)\r?$", re.M)


# --- the messages -----------------------------------------------------------------


def recipient(number: int, domains: int) -> str:
    return f"user{number}@d{number % domains}.test"


def newsletter(number: int, rcpt: str, size: int) -> bytes:
    """A campaign message of about `size` bytes (CRLF), text and HTML parts, numbered in X-Campaign-Seq."""
    head = (
        f"From: Example News <{USER}>\r\nTo: <{rcpt}>\r\n"
        f"Subject: Our newsletter, issue {number % 97}: twelve things worth reading\r\n"
        f"Date: {formatdate(localtime=True)}\r\nMessage-ID: <{number}.{time.time_ns()}@{DOMAIN}>\r\n"
        f"X-Campaign-Seq: {number}\r\nMIME-Version: 1.0\r\n"
        f"List-Unsubscribe: <https://{DOMAIN}/u?r={rcpt}>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        'Content-Type: multipart/alternative; boundary="=_p1"\r\n\r\n'
        "--=_p1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    words = "the quick brown fox jumps over a lazy dog while our team ships new features".split()
    lines: list[str] = []
    room = size - len(head) - 80
    i = 0
    while room > 0:
        line = " ".join(words[(i + k) % len(words)] for k in range(11))
        line = (f"<p>{line}</p>" if i % 2 else line.capitalize() + ".") + "\r\n"
        lines.append(line)
        room -= len(line)
        i += 3
    half = len(lines) // 2
    body = "".join(lines[:half]) + "--=_p1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + "".join(lines[half:])
    return (head + body + "--=_p1--\r\n").encode()


# --- the campaign tool: one process per connection ---------------------------------


@dataclass
class Connection:
    index: int
    source: str
    opened: float = 0.0  # seconds after the start: connect() began
    authenticated: float | None = None  # 235 received
    finished: float | None = None
    sent: int = 0
    error: str = ""


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the servers' self-signed pair
    return context


def submit(index: int, port: int, numbers: list[int], domains: int, size: int, delay: float,
           start: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:
    """One campaign connection: STARTTLS, AUTH PLAIN, then its share of the messages, one transaction each."""
    messages = [(recipient(n, domains), newsletter(n, recipient(n, domains), size)) for n in numbers]
    context = client_context()
    conn = Connection(index, CLIENT_ADDRESS.format(index + 1))
    start.wait()
    t0 = time.time()
    time.sleep(delay)
    conn.opened = time.time() - t0
    try:
        with smtplib.SMTP("127.0.0.1", port, source_address=(conn.source, 0), timeout=120) as client:
            client.ehlo("campaign.example.test")
            client.starttls(context=context)
            client.ehlo("campaign.example.test")
            client.user, client.password = USER, PASSWORD
            client.auth("PLAIN", client.auth_plain)
            conn.authenticated = time.time() - t0
            for rcpt, message in messages:
                client.sendmail(USER, [rcpt], message)
                conn.sent += 1
        conn.finished = time.time() - t0
    except (OSError, smtplib.SMTPException) as exc:
        conn.error = f"{type(exc).__name__}: {exc}"
    results.put((t0, conn))


def run_campaign(port: int, args) -> tuple[float, list[Connection]]:
    """All connections, together or `--stagger` seconds apart; returns the start (monotonic) and each connection."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(args.connections + 1)
    results = ctx.Queue()
    processes = [ctx.Process(target=submit, args=(k, port, list(range(k, args.messages, args.connections)),
                                                  args.domains, args.size, k * args.stagger, start, results))
                 for k in range(args.connections)]
    for process in processes:
        process.start()
    start.wait(timeout=120)  # every client has built its messages
    began = time.monotonic()
    connections = []
    for _ in processes:
        _, conn = results.get(timeout=args.stall_timeout * 20)
        connections.append(conn)
    for process in processes:
        process.join()
    return began, sorted(connections, key=lambda c: c.index)


# --- sinks, DNS, verification ---------------------------------------------------------


def zone(domains: int) -> list[list[str]]:
    """d<n>.test MX mx<n>.d<n>.test, each MX host on one of the sinks: 100 destinations, as a campaign has."""
    records = []
    for n in range(domains):
        records.append([f"d{n}.test", "MX", f"10 mx{n}.d{n}.test"])
        records.append([f"mx{n}.d{n}.test", "A", SINK_ADDRESSES[n % len(SINK_ADDRESSES)]])
    return records


def start_sinks(folder: Path, port: int) -> list[SmtpSink]:
    folder.mkdir(parents=True)
    nobody = pwd.getpwnam("nobody")
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)  # smtp-sink writes as nobody
    # One folder a second: smtp-sink names files by a random 32-bit number.
    return [SmtpSink(address, port, dump_template=f"{folder}/{address}/%H%M%S/m.") for address in SINK_ADDRESSES]


def stop_all(things) -> None:
    for thing in things:
        thing.stop()


def wait_for_sinks(sinks: list[SmtpSink], target: int, since: float, stall_timeout: float) -> float | None:
    """The moment (monotonic) the sinks together counted `target` messages; None if nothing moved for stall_timeout."""
    while True:
        count = sum(s.messages for s in sinks)
        last = max([since, *(s.changed for s in sinks)])
        if count >= target:
            return last
        if time.monotonic() - last > stall_timeout:
            return None
        time.sleep(0.05)


def dumped(folder: Path) -> list[Path]:
    return [Path(top) / name for top, _, names in os.walk(folder) for name in names]


def verify_one(path: Path, record: bytes) -> tuple[int | None, bool]:
    """(X-Campaign-Seq, whether the DKIM signature verifies) of one dumped message."""
    import dkim
    data = SINK_HEADERS.sub(b"", path.read_bytes(), count=1)
    found = SEQUENCE.search(data)
    data = re.sub(rb"\r?\n", b"\r\n", data)
    ok = b"DKIM-Signature:" in data and dkim.verify(data, dnsfunc=lambda name, timeout=5: record)
    return (int(found.group(1)) if found else None), bool(ok)


def sequence_of(path: Path) -> int | None:
    found = SEQUENCE.search(path.read_bytes())
    return int(found.group(1)) if found else None


@dataclass
class Verified:
    arrived: int
    duplicates: int
    missing: int
    dkim_checked: int
    dkim_failed: int

    @property
    def ok(self) -> bool:
        return self.duplicates == 0 and self.missing == 0 and self.dkim_checked > 0 and self.dkim_failed == 0


def verify(folder: Path, messages: int, record: str, sample: int) -> Verified:
    """Every message arrived exactly once; DKIM verifies on all of them (sample 0) or on `sample` at random."""
    files = dumped(folder)
    with ProcessPoolExecutor(os.cpu_count() or 2) as pool:
        numbers = list(pool.map(sequence_of, files, chunksize=256))
        chosen = files if not sample or sample >= len(files) else random.sample(files, sample)
        checks = list(pool.map(verify_one, chosen, [record.encode()] * len(chosen), chunksize=64))
    counts = Counter(numbers)
    duplicates = sum(c - 1 for n, c in counts.items() if c > 1)
    missing = len(set(range(messages)) - set(counts))
    return Verified(len(files), duplicates, missing, len(checks), sum(1 for _, ok in checks if not ok))


# --- CPU from /proc -------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def process_cpu(roots: list[int]) -> dict[int, float]:
    """CPU seconds (utime+stime) of each root, its reaped children (added to the root) and its live children."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fields = _stat(pid)
        except (OSError, ValueError):
            continue
        if pid in roots:
            cpu[pid] = cpu.get(pid, 0.0) + sum(int(f) for f in fields[11:15]) / ticks
        elif int(fields[1]) in roots:
            cpu[pid] = cpu.get(pid, 0.0) + sum(int(f) for f in fields[11:15]) / ticks
    return cpu


def harness_cpu(servers: list[int]) -> float:
    """CPU seconds of this script and its children (clients once joined, sinks, DNS), servers left out."""
    return sum(seconds for pid, seconds in process_cpu([os.getpid()]).items() if pid not in servers)


def machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle (all cores), from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_used(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    return {pid: seconds - before.get(pid, 0.0) for pid, seconds in after.items()}


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


# --- one side's result ---------------------------------------------------------------


@dataclass
class Result:
    side: str
    messages: int
    seconds: float | None
    connections: list[Connection]
    cpu: dict[str, float]  # process label -> CPU seconds during the run
    verified: Verified | None = None
    split: dict[str, int] = field(default_factory=dict)  # process label -> connections it took
    harness: float = 0.0  # cores the client, sinks and DNS server kept busy
    others: float = 0.0  # cores busy with anything else: other jobs on a shared machine

    @property
    def rate(self) -> float | None:
        return self.messages / self.seconds if self.seconds else None

    @property
    def cpu_ms(self) -> float:
        return 1000 * sum(self.cpu.values()) / self.messages

    @property
    def auth_all(self) -> float | None:
        """Seconds from the start until the last connection was authenticated."""
        done = [c.authenticated for c in self.connections]
        return max(done) if done and None not in done else None

    @property
    def auth_slowest(self) -> float | None:
        """The longest any one connection took from connect() to 235."""
        done = [c.authenticated - c.opened for c in self.connections if c.authenticated is not None]
        return max(done) if len(done) == len(self.connections) else None

    @property
    def ok(self) -> bool:
        return (self.seconds is not None and self.verified is not None and self.verified.ok
                and not any(c.error for c in self.connections))


def measure(side: str, port: int, args, sinks: list[SmtpSink],
            roots: list[int]) -> tuple[float | None, list[Connection], dict[int, float], tuple[float, float]]:
    """Run the campaign against `port`; returns seconds until the sinks had it all, the connections,
    CPU per pid, and the cores the harness and the rest of the machine kept busy meanwhile."""
    before, busy, harness = process_cpu(roots), machine_busy(), harness_cpu(roots)
    base = sum(s.messages for s in sinks)
    began, connections = run_campaign(port, args)
    for c in connections:
        if c.error:
            log(f"{side}: connection {c.index} failed after {c.sent} messages: {c.error}")
    end = wait_for_sinks(sinks, base + args.messages, began, args.stall_timeout)
    cpu = cpu_used(before, process_cpu(roots))
    wall = time.monotonic() - began
    harness = harness_cpu(roots) - harness
    others = (machine_busy() - busy - sum(cpu.values()) - harness) / wall
    return (end - began if end is not None else None), connections, cpu, (harness / wall, others)


# --- where mailhost's CPU goes (py-spy) ---------------------------------------------------------

# The step a sample belongs to: the frame nearest the leaf that names one of these (file path fragments).
STEPS = (
    ("DKIM signing", ("authn/dkim", "/dkim/")),
    # scrypt runs on the auth threads, whose stacks start in the thread pool: users.py is the frame.
    ("AUTH (scrypt)", ("local/users", "local/verified", "local/auth", "hashlib", "sasl")),
    ("TLS", ("/ssl.py", "OpenSSL/", "twisted/protocols/tls", "ops/tls")),
    ("spool, fsync", ("queue/", "ops/durable")),
    ("delivery", ("delivery/", "smtp/client")),
    ("intake", ("intake/",)),
    ("SMTP server", ("smtp/server", "smtp/wire", "smtp/transport")),
    ("logging", ("twisted/logger", "ops/logs")),
)


def start_profiler(pid: int, out: Path, venv: Path) -> subprocess.Popen:
    """py-spy sampling the daemon and its workers (non-blocking: it does not pause them), raw stacks to `out`."""
    found = venv / "bin" / "py-spy"  # where `pip install py-spy` into the venv puts it
    return subprocess.Popen([str(found) if found.exists() else "py-spy", "record", "--pid", str(pid), "--subprocesses",
                             "--nonblocking", "--rate", "100", "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        stop_process(process)


def profile_steps(raw: Path) -> dict[str, float]:
    """Share of the samples per step, from py-spy's raw output ("frame;frame;... count" lines, root first)."""
    counts: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        frames = stack.split(";")
        step = next((name for frame in reversed(frames) for name, parts in STEPS
                     if any(part in frame for part in parts)), "reactor, other")
        counts[step] += int(number)
    total = sum(counts.values()) or 1
    return {step: count / total for step, count in counts.most_common()}


# --- mailhost ------------------------------------------------------------------------------

MAILHOST_TOML = """\
[server]
hostname = "mail.example.test"
state_dir = "{root}/state"
tls_cert = "{cert}"
tls_key = "{key}"
{workers}

[[listener]]
role = "submission"
endpoint = "tcp:{port}:interface=127.0.0.1"

[limits]
greet_pause = "0s"

[relay]
networks = []
nameservers = ["{nameserver}"]
mx_port = {mx_port}

[[domain]]
name = "{domain}"
maildir = "{root}/mail"
users = "{root}/users"
"""


def mailhost_split(log_text: str) -> tuple[dict[str, int], dict[str, int]]:
    """Connections (by client address) and messages per process, from the `accepted` lines."""
    clients: dict[str, set[str]] = {}
    messages: Counter[str] = Counter()
    for line in log_text.splitlines():
        found = re.search(r": accepted client=\[([^\]]+)\]", line)
        if not found:
            continue
        worker = re.search(r" worker (\d+)\]", line)
        process = f"worker {worker.group(1)}" if worker else "main"
        clients.setdefault(process, set()).add(found.group(1))
        messages[process] += 1
    return {p: len(c) for p, c in sorted(clients.items())}, dict(sorted(messages.items()))


def mailhost_labels(log_text: str, main_pid: int) -> dict[int, str]:
    labels = {main_pid: "main"}  # with the CPU of children it reaped
    for number, pid in re.findall(r"worker (\d+) started: pid (\d+)", log_text):
        labels[int(pid)] = f"worker {number}"
    return labels


def wait_until_listening(daemon: Mailhost, workers: int | None, timeout: float = 60) -> None:
    """The port accepts and every worker the log says was started also says it listens
    (`workers` None: however many the config's default makes)."""
    deadline = time.monotonic() + timeout
    if workers and workers > 1:
        daemon.wait_for_log(r"(?s)(worker \d+ listening.*){%d}" % (workers - 1), timeout=timeout)
    while time.monotonic() < deadline:
        text = daemon.log()
        started = set(re.findall(r"worker (\d+) started", text))
        if daemon.accepts() and started <= set(re.findall(r"worker (\d+) listening", text)):
            return
        if not daemon.alive():
            break
        time.sleep(0.1)
    raise RuntimeError(f"mailhost did not listen within {timeout:.0f}s:\n{tail(daemon.log_file)}")


def run_mailhost(root: Path, args, workers: int | None, tls: tuple[Path, Path], record_out: list[str],
                 sinks: list[SmtpSink], nameserver: str) -> Result:
    from mailhost.authn.dkim import generate
    daemon = Mailhost(root, args.venv / "bin", nameserver=nameserver, mx_port=sinks[0].port)
    daemon.config.write_text(MAILHOST_TOML.format(
        root=root, cert=tls[0], key=tls[1], workers=f"workers = {workers}" if workers else "",
        port=daemon.port, nameserver=nameserver, mx_port=sinks[0].port, domain=DOMAIN))
    subprocess.run([str(args.venv / "bin" / "mailhost"), "--config", str(daemon.config), "user", "add",
                    "--password-stdin", USER], input=PASSWORD, text=True, check=True, capture_output=True,
                   env=tree_env())
    key_path, record = generate(daemon.state_dir, DOMAIN, SELECTOR)
    record_out.append(record)
    label = f"mailhost workers={workers or 'default'}"
    try:
        daemon.start()
        wait_until_listening(daemon, workers)
        log(f"{label} (pid {daemon.process.pid}) on 127.0.0.1:{daemon.port}; campaign starts")
        profiler = start_profiler(daemon.process.pid, root / "py-spy.txt", args.venv) if args.py_spy else None
        try:
            seconds, connections, cpu, load = measure(label, daemon.port, args, sinks, [daemon.process.pid])
        finally:
            if profiler is not None:
                stop_profiler(profiler)
        if profiler is not None and (root / "py-spy.txt").exists():
            log("  py-spy, samples by step: " + ", ".join(f"{step} {100 * share:.0f}%" for step, share
                                                            in profile_steps(root / "py-spy.txt").items()))
        text = daemon.log()
        names = mailhost_labels(text, daemon.process.pid)
        split, per_process = mailhost_split(text)
        log(f"  messages accepted per process: {per_process}")
    finally:
        daemon.stop()
    if seconds is None:
        log(f"  STALLED: sinks at {sum(s.messages for s in sinks)}; log tail:\n{tail(daemon.log_file)}")
    return Result(label, args.messages, seconds, connections,
                  {names.get(pid, f"pid {pid}"): s for pid, s in cpu.items()}, split=split, harness=load[0], others=load[1])


# --- Postfix + OpenDKIM ------------------------------------------------------------------------

OPENDKIM_CONF = """\
Syslog                  no
Mode                    s
Domain                  {domain}
Selector                {selector}
KeyFile                 {key}
Canonicalization        relaxed/relaxed
SignatureAlgorithm      rsa-sha256
OversignHeaders         From
Socket                  local:{socket}
UMask                   007
UserID                  {user}
RequireSafeKeys         false
"""

SASL_CONF = """\
pwcheck_method: auxprop
auxprop_plugin: sasldb
sasldb_path: {sasldb}
mech_list: PLAIN LOGIN
"""

# The submission service, as Debian's master.cf has it commented out, with the milter.
SUBMISSION_OPTIONS = (
    "syslog_name=postfix/submission",
    "smtpd_tls_security_level=encrypt",
    "smtpd_sasl_auth_enable=yes",
    "smtpd_tls_auth_only=yes",
    "smtpd_client_restrictions=permit_sasl_authenticated,reject",
    "smtpd_relay_restrictions=permit_sasl_authenticated,reject",
    "smtpd_recipient_restrictions=permit_sasl_authenticated,reject",
    "milter_macro_daemon_name=ORIGINATING",
    "smtpd_milters=unix:{socket}",
)


class OpenDkim:
    """`opendkim -f -x CONF` signing for DOMAIN with the given key, on a unix socket; stopped by PID."""

    def __init__(self, root: Path, key: Path) -> None:
        owner = pwd.getpwnam(MAIL_OWNER)
        root.mkdir(parents=True)
        os.chown(root, owner.pw_uid, owner.pw_gid)
        self.key = root / f"{SELECTOR}.key"
        shutil.copy(key, self.key)
        os.chown(self.key, owner.pw_uid, owner.pw_gid)
        self.key.chmod(0o600)
        self.socket = root / "opendkim.sock"
        self.conf = root / "opendkim.conf"
        self.conf.write_text(OPENDKIM_CONF.format(domain=DOMAIN, selector=SELECTOR, key=self.key,
                                                  socket=self.socket, user=MAIL_OWNER))
        self.stderr = root / "opendkim.log"
        with open(self.stderr, "wb") as out:
            self.process = subprocess.Popen(["opendkim", "-f", "-x", str(self.conf)], stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"opendkim did not open {self.socket}: {tail(self.stderr)}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.process)


def private_sasl(folder: Path) -> Path:
    """A Cyrus SASL config dir for smtpd with its own sasldb holding USER (plaintext, as sasldb stores it)."""
    owner = pwd.getpwnam(MAIL_OWNER)
    folder.mkdir(parents=True)
    sasldb = folder / "sasldb2"
    local, _, realm = USER.partition("@")
    subprocess.run(["saslpasswd2", "-f", str(sasldb), "-c", "-p", "-u", realm, local], input=PASSWORD,
                   text=True, check=True, capture_output=True)
    os.chown(sasldb, owner.pw_uid, owner.pw_gid)
    (folder / "smtpd.conf").write_text(SASL_CONF.format(sasldb=sasldb))
    return folder


def make_submission(instance: Postfix, socket: Path) -> None:
    """Turn the instance's smtpd line in master.cf into a submission service with -o options."""
    master = instance.etc / "master.cf"
    lines = master.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.split()[1:2] == ["inet"] and line.rstrip().endswith("smtpd"):
            lines[i] = line + "".join(f"  -o {o.format(socket=socket)}\n" for o in SUBMISSION_OPTIONS)
            break
    else:
        raise RuntimeError(f"no smtpd line in {master}")
    master.write_text("".join(lines))


def run_postfix(root: Path, args, tls: tuple[Path, Path], key: Path, sinks: list[SmtpSink]) -> Result:
    opendkim = OpenDkim(root / "opendkim", key)
    # Debian's Postfix reads Cyrus's smtpd.conf from $config_directory/sasl/, whatever
    # cyrus_sasl_config_path says.
    instance = Postfix(root / "instance", listen="127.0.0.1:0", hostname="mta.postfix.test", tls=tls,
                       resolver=DNS_ADDRESS,
                       settings=[f"smtp_tcp_port = {sinks[0].port}", f"cyrus_sasl_config_path = {root}/instance/etc/sasl",
                                 "smtpd_sasl_path = smtpd", "milter_default_action = tempfail"])
    label = "postfix + opendkim"
    try:
        instance.configure()
        private_sasl(instance.etc / "sasl")
        make_submission(instance, opendkim.socket)
        instance.start()
        log(f"{label} (master pid {instance.master_pid}, opendkim pid {opendkim.process.pid}) on "
            f"127.0.0.1:{instance.port}; campaign starts")
        seconds, connections, cpu, load = measure(label, instance.port, args, sinks,
                                            [instance.master_pid, opendkim.process.pid])
        labels = {pid: "opendkim" if pid == opendkim.process.pid else
                  "master + exited children" if pid == instance.master_pid else process_name(pid) for pid in cpu}
        maillog = instance.log()
        sent = len(re.findall(r" status=sent ", maillog))
        relays = set(re.findall(r" relay=(mx\d+\.d\d+\.test)\[", maillog))
        log(f"  maillog: {sent} status=sent, through {len(relays)} MX hosts found in DNS")
    finally:
        instance.stop()
        opendkim.stop()
    if seconds is None:
        log(f"  STALLED: sinks at {sum(s.messages for s in sinks)}; maillog tail:\n{tail(instance.log_file)}")
    by_name: Counter[str] = Counter()
    for pid, seconds_used in cpu.items():
        by_name[labels[pid]] += seconds_used
    return Result(label, args.messages, seconds, connections, dict(by_name), harness=load[0], others=load[1])


# --- main ---------------------------------------------------------------------------------


def self_signed(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=mail.example.test", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    key.chmod(0o600)
    return cert, key


def one_side(name: str, workers: int | None, tmp: Path, run: int, args, tls, key_holder: list, port: int,
             nameserver: str) -> Result:
    folder = tmp / f"run{run}-{name}{workers or ''}"
    if not args.no_disk_wait:
        wait_for_quiet_disk(tmp / "probe", limit=120)
    dump = Path(tempfile.mkdtemp(prefix="campaign-sink-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    dump.chmod(0o711)  # smtp-sink runs as nobody
    sinks = start_sinks(dump / "d", port)
    try:
        if name == "mailhost":
            records: list[str] = []
            result = run_mailhost(folder, args, workers, tls, records, sinks, nameserver)
            key_holder[:] = [folder / "state" / "dkim" / DOMAIN / f"{SELECTOR}.key", records[0]]
        else:
            result = run_postfix(folder, args, tls, key_holder[0], sinks)
        time.sleep(1)  # a late duplicate would show up now
        stop_all(sinks)
        result.verified = verify(dump / "d", args.messages, key_holder[1], args.dkim_sample)
    finally:
        stop_all(sinks)
        shutil.rmtree(dump, ignore_errors=True)
    report(result)
    return result


def report(r: Result) -> None:
    v = r.verified
    cpu = ", ".join(f"{name} {seconds:.1f}" for name, seconds in sorted(r.cpu.items(), key=lambda x: -x[1])[:8])
    log(f"{r.side}: " + (f"{r.messages} in {r.seconds:.1f}s = {r.rate:.0f} msg/s" if r.seconds else "did not finish")
        + f"; CPU {r.cpu_ms:.2f} ms/msg ({cpu}); AUTH all done {fmt(r.auth_all, 's', 2)}, slowest "
        f"{fmt(r.auth_slowest, 's', 2)}; split {r.split or '-'}; harness {r.harness:.2f} cores, other jobs {r.others:.2f} cores; "
        + (f"arrived {v.arrived}, duplicates {v.duplicates}, missing {v.missing}, DKIM {v.dkim_checked - v.dkim_failed}"
           f"/{v.dkim_checked} verify" if v else "not verified"))


def fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    return f"{value:.{digits}f}{unit}" if value is not None else "-"


def print_table(results: dict[str, list[Result]], args) -> None:
    postfix = median([r.rate for r in results.get("postfix + opendkim", [])])
    rows = [("side", "msg/s (median)", "runs", "ratio to postfix", "CPU ms/msg", "AUTH all (s)", "AUTH slowest (s)",
             "connection split", "other jobs (cores)", "verified")]
    for side, runs in results.items():
        rate = median([r.rate for r in runs])
        splits = " | ".join(",".join(f"{p}:{n}" for p, n in r.split.items()) for r in runs if r.split) or "-"
        rows.append((side, fmt(rate), " ".join(fmt(r.rate) for r in runs),
                     f"{rate / postfix:.2f}x" if rate and postfix else "-",
                     fmt(median([r.cpu_ms for r in runs]), "", 2), fmt(median([r.auth_all for r in runs]), "", 2),
                     fmt(median([r.auth_slowest for r in runs]), "", 2), splits,
                     fmt(median([r.others for r in runs]), "", 2),
                     "yes" if all(r.ok for r in runs) else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    arrival = "together" if not args.stagger else f"{args.stagger:g} s apart"
    print(f"\nCampaign: {args.messages} x ~{args.size} B over {args.connections} STARTTLS+AUTH connections "
          f"({arrival}) to {args.domains} domains by MX, DKIM rsa-sha256 relaxed/relaxed; median of {args.runs}")
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j in (0, 7) else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for side, runs in results.items():
        cpu: Counter[str] = Counter()
        for r in runs:
            for name, seconds in r.cpu.items():
                cpu[name] += 1000 * seconds / r.messages / len(runs)
        print(f"  {side} CPU ms/msg by process: " + ", ".join(f"{n} {ms:.2f}" for n, ms in cpu.most_common(10)))


def median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=10000, help="messages per side and run (default 10000)")
    p.add_argument("--runs", type=int, default=3, help="runs of each side; the table shows the median (default 3)")
    p.add_argument("--workers", type=int, action="append",
                   help="mailhost's [server] workers; repeat to measure several (default: the config's default)")
    p.add_argument("--stagger", type=float, default=0.0,
                   help="seconds between the connections' arrivals (default 0: all together; e.g. 0.1)")
    p.add_argument("--connections", type=int, default=10, help="authenticated connections (default 10)")
    p.add_argument("--domains", type=int, default=100, help="recipient domains, each its own MX (default 100)")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes, about (default 4096)")
    p.add_argument("--only", choices=("mailhost", "postfix"), help="run one side only")
    p.add_argument("--dkim-sample", type=int, default=1000,
                   help="messages per side and run whose DKIM signature is verified (0: all; default 1000)")
    p.add_argument("--stall-timeout", type=float, default=60.0, help="give up when nothing arrives for this long")
    p.add_argument("--no-disk-wait", action="store_true", help="do not wait for a quiet disk before each side")
    p.add_argument("--venv", type=Path, default=REPO / ".venv", help="virtualenv with twistd and mailhost")
    p.add_argument("--py-spy", action="store_true",
                   help="sample mailhost with py-spy during the run and print the share of each step "
                        "(costs CPU: not for the figures)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, maillog)")
    p.add_argument("--json", type=Path, help="also write the figures to this file (for bench/targets.py)")
    return p.parse_args()


def check_prerequisites(args) -> None:
    reason = unavailable()
    if reason:
        sys.exit(f"bench/campaign.py: {reason}")
    for tool, package in (("smtp-sink", "postfix (tests/ensure-peers)"), ("opendkim", "opendkim"),
                          ("saslpasswd2", "sasl2-bin"), ("openssl", "openssl")):
        if shutil.which(tool) is None:
            sys.exit(f"bench/campaign.py: {tool} not found: apt-get install -y {package}")
    for tool in ("twistd", "mailhost"):
        if not (args.venv / "bin" / tool).exists():
            sys.exit(f"{args.venv / 'bin' / tool} missing: make venv")


def main() -> int:
    args = parse_args()
    args.venv = args.venv.resolve()
    check_prerequisites(args)
    exit_on_signals()

    tmp = Path(tempfile.mkdtemp(prefix="mailhost-bench-campaign-"))
    tmp.chmod(0o711)  # opendkim and Postfix's daemons run as postfix and must reach their folders
    results: dict[str, list[Result]] = {}
    failed = False
    dns = None
    try:
        tls = self_signed(tmp / "tls")
        dns = ZoneServer(tmp / "dns", zone(args.domains), DNS_ADDRESS, 53)
        port = free_port(SINK_ADDRESSES[0])
        key_holder: list = []
        sides = [] if args.only == "postfix" else [("mailhost", w) for w in (args.workers or [None])]
        if args.only != "mailhost":
            sides.append(("postfix", None))
            if not sides[0][0] == "mailhost":  # Postfix alone still needs the key: make one
                from mailhost.authn.dkim import generate
                key_holder[:] = generate(tmp / "keys", DOMAIN, SELECTOR)
        for run in range(args.runs):
            for name, workers in sides:
                r = one_side(name, workers, tmp, run, args, tls, key_holder, port, dns.nameserver)
                results.setdefault(r.side, []).append(r)
                failed |= not r.ok
    except (RuntimeError, PostfixError, subprocess.SubprocessError, OSError) as exc:
        failed = True
        log(f"error: {exc}")
    finally:
        if dns is not None:
            dns.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(results, args)
    if args.json:
        mailhost = [runs for side, runs in results.items() if side.startswith("mailhost")]
        write_json(args.json, {
            "ok": not failed, "stagger": args.stagger,
            "mailhost": median([r.rate for r in mailhost[-1]]) if mailhost else None,
            "postfix": median([r.rate for r in results.get("postfix + opendkim", [])]),
            "sides": {side: {"rates": [r.rate for r in runs], "cpu_ms": [r.cpu_ms for r in runs],
                             "others": [r.others for r in runs],
                             "auth_all": [r.auth_all for r in runs], "split": [r.split for r in runs]}
                      for side, runs in results.items()}})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
