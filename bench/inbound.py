#!/usr/bin/env python3
"""Inbound SMTP benchmark: mailhost versus a private Postfix instance.

Both servers are started in the same run, listen on loopback only, and are
loaded one after the other (never at the same time, so they do not compete
for CPU) with Postfix's own load generator, smtp-source(1).  A run counts as
finished when every message is present as a file in the recipient's Maildir
``new/`` directory, so Postfix's queue-then-deliver design and mailhost's
deliver-before-250 design are measured at the same point: mail on disk.
Before anything runs, it waits until creating a file costs what it does on a
quiet disk (bench/README.md: a disk that has just deleted many files).

Run from the repository root:

    .venv/bin/python bench/inbound.py [--messages 5000] [--sessions 20] [--size 4096]

Needs root (Postfix is started privately, and drops to its mail_owner), the
Debian ``postfix`` package (for postfix, postconf and smtp-source), and
mailhost installed in .venv.  Uses the standard library, the private-Postfix
helper in tests/support/postfix.py, and bench/common.py's CPU-time reader.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.support.postfix (standard library only)

from tests.support.postfix import Postfix, PostfixError  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from common import cpu_seconds, wait_for_quiet_disk, write_json  # noqa: E402

LOOPBACK = "127.0.0.1"
RECIPIENT = "alice@example.test"
SENDER = "sender@client.test"
CLIENT_HELO = "client.test"


# --------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command, failing loudly with its output if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc


def free_port() -> int:
    """An unprivileged loopback port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, alive: Callable[[], bool]) -> None:
    """Poll until something accepts on the port; give up early if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server for port {port} exited during startup")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {LOOPBACK}:{port} after {timeout}s")


def wait_for_log(path: Path, text: str, timeout: float, alive: Callable[[], bool]) -> None:
    """Poll a log file until it holds `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("server exited during startup")
        if text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"no {text!r} in {path} after {timeout}s")


def count_files(directory: Path) -> int:
    try:
        with os.scandir(directory) as it:
            return sum(1 for entry in it if entry.is_file())
    except FileNotFoundError:
        return 0


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


# --------------------------------------------------------------------------
# servers under test


@dataclass
class Server:
    """What a benchmark run needs to know about a running server."""

    name: str
    port: int
    maildir_new: Path  # where delivered mail for RECIPIENT appears
    log_file: Path
    stop: Callable[[], None] = field(repr=False)
    cpu: Callable[[], float] = field(repr=False, default=lambda: 0.0)  # CPU seconds used so far, all its processes


MAILHOST_TOML = """\
[server]
hostname = "mail.example.test"
state_dir = "{root}/state"
{workers_line}

[[listener]]
role = "mx"
endpoint = "tcp:{port}:interface=127.0.0.1"

[limits]
connections_per_ip = 1000
recipients = 1000
greet_pause = "0s"

[[domain]]
name = "example.test"
maildir = "{root}/mail"
users = "{root}/users"
catch_all = "alice"
"""


def start_mailhost(root: Path, venv_bin: Path, workers: int = 1, profile: Path | None = None) -> Server:
    """Configure, provision and start mailhost under twistd in the foreground."""
    root.mkdir(parents=True)
    port = free_port()
    cfg = root / "mailhost.toml"
    # (always written: the default is "auto", one process per core)
    cfg.write_text(MAILHOST_TOML.format(root=root, port=port,
                                        workers_line=f"workers = {workers}"))
    # The code of this tree, whatever the venv has installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    run(
        [str(venv_bin / "mailhost"), "--config", str(cfg),
         "user", "add", RECIPIENT, "--password-stdin"],
        input="bench-password\n", cwd=REPO, env=env,
    )
    log_file = root / "twistd.log"
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(
            [str(venv_bin / "twistd"), "-n", "--pidfile=",
             *(["--profiler=cprofile", "--savestats", f"--profile={profile}"] if profile else []),
             "mailhost", "--config", str(cfg)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, env=env,
        )

    def stop() -> None:
        # Only ever signal the PID we started.
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log("mailhost ignored SIGTERM for 10 s; sending SIGKILL")
            proc.kill()
            proc.wait()

    # The daemon and its workers (its children).
    server = Server("mailhost", port, root / "mail" / "alice" / "new", log_file, stop,
                    lambda: cpu_seconds(proc.pid, children=True))
    try:
        wait_for_port(port, 30, lambda: proc.poll() is None)
        for number in range(1, workers):
            wait_for_log(log_file, f"worker {number} listening", 30, lambda: proc.poll() is None)
    except Exception:
        stop()
        raise RuntimeError(f"mailhost did not start:\n{tail(log_file)}")
    log(f"mailhost (pid {proc.pid}, workers = {workers}) listening on {LOOPBACK}:{port}")
    return server


def start_postfix(root: Path) -> Server:
    """Create and start a private Postfix instance rooted at ``root``.

    The set-up (loopback only, virtual Maildir delivery for RECIPIENT, Postfix's
    default fsyncs, a maillog file) lives in tests/support/postfix.py.
    """
    instance = Postfix(root, listen=f"{LOOPBACK}:0", mailboxes=[RECIPIENT],
                       hostname="mx.postfix.test")
    try:
        instance.start()
    except PostfixError as exc:
        raise RuntimeError(f"postfix did not start: {exc}") from None
    log(f"postfix (master pid {instance.master_pid}) listening on {LOOPBACK}:{instance.port}")
    return Server("postfix", instance.port, instance.maildir(RECIPIENT) / "new",
                  instance.log_file, instance.stop, lambda: cpu_seconds(instance.master_pid, children=True))


# --------------------------------------------------------------------------
# load generation and verification


@dataclass
class Scenario:
    name: str
    messages: int
    sessions: int
    reuse: bool  # smtp-source -d: several messages per connection


@dataclass
class Result:
    messages: int
    accept_seconds: float   # until smtp-source had every 250
    deliver_seconds: float  # until every message was in Maildir new/
    delivered: int
    cpu_seconds: float = 0.0  # CPU the server used meanwhile (all its processes)

    @property
    def ok(self) -> bool:
        return self.delivered == self.messages

    @property
    def rate(self) -> float:
        return self.messages / self.deliver_seconds

    @property
    def cpu_ms(self) -> float:
        """CPU milliseconds per message."""
        return 1000 * self.cpu_seconds / self.messages


def smtp_source(server: Server, messages: int, sessions: int, size: int,
                reuse: bool) -> None:
    cmd = ["smtp-source", "-4", "-s", str(sessions), "-m", str(messages),
           "-l", str(size), "-M", CLIENT_HELO, "-f", SENDER, "-t", RECIPIENT]
    if reuse:
        cmd.append("-d")
    cmd.append(f"{LOOPBACK}:{server.port}")
    # Without -A, smtp-source exits non-zero on any unexpected reply.
    # Bounded, so a wedged server fails the run instead of hanging it
    # (allows for as little as 10 msg/s).
    run(cmd, timeout=max(300.0, messages * 0.1))


def wait_for_delivery(new_dir: Path, target: int, stall_timeout: float) -> int:
    """Poll until ``target`` files are in new/; give up if progress stalls."""
    last, last_change = -1, time.monotonic()
    while True:
        n = count_files(new_dir)
        if n >= target:
            return n
        now = time.monotonic()
        if n != last:
            last, last_change = n, now
        elif now - last_change > stall_timeout:
            return n
        time.sleep(0.02)


def measure(server: Server, messages: int, sessions: int, size: int, reuse: bool,
            stall_timeout: float) -> Result:
    before = count_files(server.maildir_new)
    cpu = server.cpu()
    start = time.monotonic()
    smtp_source(server, messages, sessions, size, reuse)
    accepted = time.monotonic() - start
    # Poll only once the load is done so the poller does not steal CPU from
    # the server; for mailhost delivery already happened before each 250.
    after = wait_for_delivery(server.maildir_new, before + messages, stall_timeout)
    delivered = time.monotonic() - start
    return Result(messages, accepted, delivered, after - before, server.cpu() - cpu)


# --------------------------------------------------------------------------
# main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=5000,
                   help="messages per multi-session scenario (default 5000)")
    p.add_argument("--sessions", type=int, default=20,
                   help="parallel SMTP sessions (default 20)")
    p.add_argument("--size", type=int, default=4096,
                   help="message body bytes (default 4096)")
    p.add_argument("--single-messages", type=int, default=1000,
                   help="messages for the 1-session scenario (default 1000)")
    p.add_argument("--warmup", type=int, default=50,
                   help="unmeasured messages sent to each server first (default 50)")
    p.add_argument("--stall-timeout", type=float, default=60.0,
                   help="give up waiting for delivery after this many seconds "
                        "without progress (default 60)")
    p.add_argument("--workers", type=int, default=1,
                   help="mailhost's [server] workers: reactor processes sharing the listener (default 1)")
    p.add_argument("--only", choices=("mailhost", "postfix"),
                   help="benchmark just one server (no ratio)")
    p.add_argument("--venv", type=Path, default=REPO / ".venv",
                   help="virtualenv holding twistd and mailhost (default .venv)")
    p.add_argument("--json", type=Path, help="also write the figures to this file (for bench/targets.py)")
    p.add_argument("--profile", type=Path,
                   help="run mailhost's main process under cProfile, stats saved to this file (read with pstats)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory for inspection")
    p.add_argument("--no-disk-wait", action="store_true",
                   help="measure at once, even when creating a file is slow after a mass deletion")
    return p.parse_args()


def check_prerequisites(servers: list[str], venv_bin: Path) -> None:
    if os.geteuid() != 0:
        sys.exit("bench/inbound.py must run as root (it starts a private Postfix)")
    for tool in ("postfix", "postconf", "smtp-source"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install -y postfix "
                     "(with /usr/sbin/policy-rc.d exiting 101 so the system "
                     "instance does not start)")
    if "mailhost" in servers:
        for tool in ("twistd", "mailhost"):
            if not (venv_bin / tool).exists():
                sys.exit(f"{venv_bin / tool} missing: install mailhost (make venv)")


def print_table(scenarios: list[Scenario], results: dict[tuple[str, str], Result],
                servers: list[str]) -> None:
    def rate(name: str, sc: Scenario) -> str:
        r = results.get((name, sc.name))
        return f"{r.rate:.0f}" if r else "-"

    def ratio(sc: Scenario) -> str:
        m, p = results.get(("mailhost", sc.name)), results.get(("postfix", sc.name))
        return f"{m.rate / p.rate:.2f}" if m and p else "-"

    def cpu(name: str, sc: Scenario) -> str:
        r = results.get((name, sc.name))
        return f"{r.cpu_ms:.2f}" if r else "-"

    def verified(sc: Scenario) -> str:
        rs = [results.get((s, sc.name)) for s in servers]
        if any(r is None for r in rs):
            return "no (not run)"
        if all(r.ok for r in rs):
            return "yes"
        return "NO: " + ", ".join(f"{s} {r.delivered}/{r.messages}"
                                  for s, r in zip(servers, rs) if not r.ok)

    rows = [("scenario", "mailhost msg/s", "postfix msg/s", "ratio m/p", "CPU ms/msg m", "CPU ms/msg p", "all verified")]
    rows += [(sc.name, rate("mailhost", sc), rate("postfix", sc), ratio(sc), cpu("mailhost", sc), cpu("postfix", sc),
              verified(sc)) for sc in scenarios]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if j in (0, 6) else cell.rjust(w)
                        for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> int:
    args = parse_args()
    venv_bin = args.venv.resolve() / "bin"
    servers = [args.only] if args.only else ["mailhost", "postfix"]
    check_prerequisites(servers, venv_bin)
    n, s = args.messages, args.sessions
    scenarios = [
        Scenario(f"{s} sessions, 1 msg/conn", n, s, reuse=False),
        Scenario(f"{s} sessions, reused conn (-d)", n, s, reuse=True),
        Scenario("1 session, 1 msg/conn", args.single_messages, 1, reuse=False),
    ]

    # Turn SIGTERM/SIGHUP into an exception so the cleanup below still runs.
    def on_signal(signum: int, _frame) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    tmp = Path(tempfile.mkdtemp(prefix="mailhost-bench-"))
    # Postfix daemons (as mail_owner) must be able to walk into their dirs.
    tmp.chmod(0o755)
    started: list[Server] = []
    results: dict[tuple[str, str], Result] = {}
    failed = False
    create_cost = None
    try:
        if not args.no_disk_wait:
            create_cost = wait_for_quiet_disk(tmp / "disk-probe")
        starters: dict[str, Callable[[Path], Server]] = {
            "mailhost": lambda root: start_mailhost(root, venv_bin, args.workers, args.profile),
            "postfix": start_postfix,
        }
        for name in servers:
            started.append(starters[name](tmp / name))
        if args.warmup:
            for server in started:
                measure(server, args.warmup, min(s, args.warmup), args.size,
                        False, args.stall_timeout)
        for sc in scenarios:
            for server in started:
                log(f"{server.name}: {sc.name}, {sc.messages} messages ...")
                r = measure(server, sc.messages, sc.sessions, args.size, sc.reuse,
                            args.stall_timeout)
                results[(server.name, sc.name)] = r
                log(f"  accepted in {r.accept_seconds:.2f}s "
                    f"({r.messages / r.accept_seconds:.0f} msg/s), all delivered in "
                    f"{r.deliver_seconds:.2f}s ({r.rate:.0f} msg/s), {r.cpu_seconds:.1f} CPU-s, "
                    f"verified {r.delivered}/{r.messages}")
                if not r.ok:
                    failed = True
                    log(f"  MISSING MAIL; {server.name} log tail:\n"
                        f"{tail(server.log_file)}")
    except Exception as exc:
        failed = True
        log(f"error: {exc}")
        for server in started:
            log(f"{server.name} log tail:\n{tail(server.log_file)}")
    finally:
        for server in reversed(started):
            try:
                server.stop()
            except Exception as exc:
                log(f"stopping {server.name} failed: {exc}")
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nInbound: {args.size}-byte bodies to one mailbox, loopback, smtp-source, "
          f"mailhost with workers = {args.workers}; msg/s = messages / seconds until all were in Maildir new/"
          + (f"; creating a file cost {create_cost:.0f} us at the start" if create_cost is not None else ""))
    print_table(scenarios, results, servers)
    if args.json:
        write_json(args.json, {"workers": args.workers, "ok": not failed, "scenarios": {
            sc.name: {name: results[(name, sc.name)].rate for name in servers if (name, sc.name) in results}
            for sc in scenarios}})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
