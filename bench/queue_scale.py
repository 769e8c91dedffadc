#!/usr/bin/env python3
"""Queue scale benchmark: mailhost starting with 100,000 queued messages.

Writes 100,000 messages of 4 KiB (one recipient each, to remote domains that
are never tried: next attempt 30 days away) into mailhost's spool with the
Spool class while the daemon is stopped, then starts `twistd -n mailhost` and
measures:

* the time until it accepts an SMTP connection (and greets with 220),
* the time until its log says "queue loaded: 100000 messages",
* its resident memory (VmRSS, and the peak VmHWM, from /proc/PID/status)
  once loaded,
* how long `mailhost queue list --json` takes against that spool, with the
  daemon running (queue loaded) and stopped (median of --list-runs runs).

For scale, the same start-up is measured first with an empty spool. With
--postfix, a private Postfix gets the same messages on hold (through its
smtpd; this takes minutes) and `postqueue -p` is timed too.

Run from the repository root, as root (only for --postfix):

    .venv/bin/python bench/queue_scale.py [--messages 100000] [--size 4096] [--postfix]
        [--dir DIR] [--list-runs 3]

With --dir the work happens in DIR, which is kept; a later run with the same
DIR reuses the spool it holds instead of writing it again (minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, Mailhost, fill_spool, log, tree_env, write_json  # noqa: E402
from tests.support.postfix import free_port, unavailable  # noqa: E402


def recipient(i: int) -> str:
    return f"user{i}@d{i % 1000}.unreachable.test"


def wait_for_greeting(port: int, started: float, stop: threading.Event, result: dict) -> None:
    """Connect every 20 ms until the daemon greets with 220; record when."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(30)
                if s.recv(512).startswith(b"220"):
                    result["greeting"] = time.monotonic() - started
                    return
        except OSError:
            pass
        time.sleep(0.02)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def wait_until_loaded(daemon: Mailhost, expected: int, timeout: float) -> int:
    """Messages the processes' "queue loaded: N messages" lines add up to, once they reach
    `expected` (or what they say when every line is in and short of it)."""
    deadline = time.monotonic() + timeout
    daemon.wait_for_log(r"queue loaded: (\d+) messages", timeout=timeout, poll=0.02)
    while True:
        text = daemon.log_file.read_bytes()[daemon.log_offset:].decode("utf-8", "replace")
        counts = [int(n) for n in re.findall(r"queue loaded: (\d+) messages", text)]
        if sum(counts) >= expected or time.monotonic() > deadline:
            return sum(counts)
        time.sleep(0.02)


def measure_start(daemon: Mailhost, expected: int, timeout: float) -> dict:
    result: dict = {}
    stop = threading.Event()
    started = daemon.start()
    poller = threading.Thread(target=wait_for_greeting, args=(daemon.port, started, stop, result), daemon=True)
    poller.start()
    try:
        # With workers (server.workers = "auto": one process a core) each process loads its own
        # shard and says so: the queue is ready when every process has.
        loaded = wait_until_loaded(daemon, expected, timeout)
        result["loaded"] = time.monotonic() - started
        result["loaded_count"] = loaded
        if loaded != expected:
            raise RuntimeError(f"mailhost loaded {loaded} messages, expected {expected}")
        poller.join(timeout)
        if "greeting" not in result:
            raise RuntimeError("mailhost never greeted an SMTP client")
        result["rss_loaded"] = proc_status(daemon.process.pid)
        time.sleep(2)  # anything allocated after the load settles
        result["rss_settled"] = proc_status(daemon.process.pid)
    finally:
        stop.set()
    return result


def time_queue_list(daemon: Mailhost, expected: int) -> tuple[float, float]:
    """Seconds `mailhost queue list --json` took, and the 1-minute load average just before."""
    load = os.getloadavg()[0]
    t = time.monotonic()
    out = subprocess.run([str(daemon.venv_bin / "mailhost"), "--config", str(daemon.config), "queue", "list", "--json"],
                         capture_output=True, timeout=1800, env=tree_env())
    elapsed = time.monotonic() - t
    if out.returncode != 0:
        raise RuntimeError(f"mailhost queue list --json failed: {out.stderr.decode(errors='replace')}")
    count = len(json.loads(out.stdout)["messages"])
    if count != expected:
        raise RuntimeError(f"mailhost queue list --json listed {count} messages, expected {expected}")
    return elapsed, load


def queued_count(spool_dir: Path) -> int:
    """Envelopes in a spool (one scan of env/)."""
    env = spool_dir / "env"
    if not env.is_dir():
        return 0
    return sum(1 for folder in os.scandir(env) for entry in os.scandir(folder.path) if entry.name.endswith(".json"))


def listing_summary(runs: list[tuple[float, float]]) -> str:
    times = [t for t, _ in runs]
    loads = [load for _, load in runs]
    return (f"{statistics.median(times):.2f}s (median of {len(times)}: {min(times):.2f}-{max(times):.2f}s, "
            f"load average {min(loads):.1f}-{max(loads):.1f})")


def postfix_postqueue(root: Path, count: int, size: int) -> tuple[float, float]:
    """Fill a private Postfix's hold queue through smtpd; returns (fill seconds, `postqueue -p` seconds)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from outbound import fill_postfix, held_count

    from tests.support.postfix import Postfix

    instance = Postfix(root, listen="127.0.0.1:0", hostname="mta.postfix.test", settings=[
        "smtpd_recipient_restrictions = check_recipient_access static:HOLD, permit_mynetworks, "
        "reject_unauth_destination",
        "in_flow_delay = 0s",
    ])
    with instance:
        t = time.monotonic()
        # recipient() here is outbound's round-robin over d<n>.test; nothing is ever delivered.
        fill_postfix(instance, count, 1000, size)
        while held_count(instance) < count:
            time.sleep(0.2)
        fill = time.monotonic() - t
        t = time.monotonic()
        out = instance.postqueue("-p", timeout=1800).stdout
        listing = time.monotonic() - t
        if f"in {count} Requests" not in out.splitlines()[-1]:
            raise RuntimeError(f"postqueue -p did not list {count} requests: {out.splitlines()[-1]}")
    return fill, listing


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000, help="queued messages (default 100000)")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    p.add_argument("--threads", type=int, default=8, help="threads writing the spool (default 8)")
    p.add_argument("--postfix", action="store_true", help="also time postqueue -p on a Postfix holding as many")
    p.add_argument("--venv", type=Path, default=REPO / ".venv", help="virtualenv with twistd and mailhost")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--dir", type=Path, help="work in DIR and keep it; reuse the spool it holds from an earlier run")
    p.add_argument("--json", type=Path, help="also write the figures to this file (for bench/targets.py)")
    p.add_argument("--list-runs", type=int, default=3, help="times to run `queue list --json` each way (default 3)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    venv_bin = args.venv.resolve() / "bin"
    for tool in ("twistd", "mailhost"):
        if not (venv_bin / tool).exists():
            sys.exit(f"{venv_bin / tool} missing: make venv")
    if args.postfix and (reason := unavailable()):
        sys.exit(f"--postfix: {reason}")

    def on_signal(signum: int, _frame) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    if args.dir:
        tmp = args.dir.resolve()
        tmp.mkdir(parents=True, exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="mailhost-bench-queue-"))
    nobody = f"127.0.0.1:{free_port('127.0.0.1')}"  # no DNS server: nothing is ever looked up
    failed = False
    empty = full = again = None
    fill = 0.0
    reused = 0
    listing_running: list[tuple[float, float]] = []
    listing_stopped: list[tuple[float, float]] = []
    postfix = None
    try:
        log("mailhost with an empty spool ...")
        daemon = Mailhost(tmp / "empty", venv_bin, nameserver=nobody, mx_port=25)
        try:
            empty = measure_start(daemon, 0, timeout=120)
        finally:
            daemon.stop()

        daemon = Mailhost(tmp / "full", venv_bin, nameserver=nobody, mx_port=25, retry=["30d"],
                          queue_extra='lifetime = "60d"\ndelay_warning = "0"')
        reused = queued_count(daemon.spool_dir)
        if reused and reused != args.messages:
            raise RuntimeError(f"{daemon.spool_dir} holds {reused} messages, not {args.messages}: "
                               "remove it or pick another --dir")
        if reused:
            log(f"reusing the {reused} messages in {daemon.spool_dir}; starting mailhost")
        else:
            log(f"writing {args.messages} messages of {args.size} B into the spool with Spool.store "
                f"({args.threads} threads, daemon stopped) ...")
            fill = fill_spool(daemon.spool_dir, args.messages, recipient, args.size,
                              next_attempt=time.time() + 30 * 86400, threads=args.threads)
            log(f"  written in {fill:.0f}s; starting mailhost")
        try:
            full = measure_start(daemon, args.messages, timeout=1800)
        finally:
            daemon.stop()
        log("starting mailhost again (the spool's files now read once) ...")
        try:
            again = measure_start(daemon, args.messages, timeout=1800)
            log("timing `mailhost queue list --json` (daemon running) ...")
            listing_running = [time_queue_list(daemon, args.messages) for _ in range(args.list_runs)]
        finally:
            daemon.stop()
        attempts = daemon.log().count(" status=")
        if attempts:
            raise RuntimeError(f"mailhost tried {attempts} deliveries during the measurement")
        log("timing `mailhost queue list --json` (daemon stopped) ...")
        listing_stopped = [time_queue_list(daemon, args.messages) for _ in range(args.list_runs)]
        if args.postfix:
            log(f"postfix: injecting {args.messages} messages on hold through smtpd (slow) ...")
            postfix = postfix_postqueue(tmp / "postfix", args.messages, args.size)
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        failed = True
        log(f"error: {exc}")
    finally:
        if args.keep or args.dir:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    def mib(kib: int) -> str:
        return f"{kib / 1024:.0f} MiB"

    print(f"\nQueue scale: mailhost with {args.messages} queued messages of {args.size} B "
          "(remote, next attempt in 30 days)")
    runs = [r for r in (empty, full, again) if r]
    first = "reused spool" if reused else f"{args.messages} queued"
    rows = [("", "empty spool", first, "same, 2nd start")[:len(runs) + 1]]
    if runs:
        rows += [
            ("accepts SMTP (220) after", *(f"{r['greeting']:.2f}s" for r in runs)),
            ('log says "queue loaded" after', *(f"{r['loaded']:.2f}s" for r in runs)),
            ("VmRSS when loaded", *(mib(r["rss_loaded"]["VmRSS"]) for r in runs)),
            ("VmRSS 2 s later / peak VmHWM",
             *(f"{mib(r['rss_settled']['VmRSS'])} / {mib(r['rss_settled']['VmHWM'])}" for r in runs)),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for i, row in enumerate(rows):
            print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
            if i == 0:
                print("  ".join("-" * w for w in widths))
    if listing_running:
        print(f"mailhost queue list --json, daemon running: {listing_summary(listing_running)} "
              f"for {args.messages} messages")
    if listing_stopped:
        print(f"mailhost queue list --json, daemon stopped: {listing_summary(listing_stopped)} "
              f"for {args.messages} messages")
    if fill:
        print(f"spool written with Spool.store in {fill:.0f}s ({args.messages / fill:.0f} msg/s, not part of the figures)")
    elif reused:
        print(f"spool of {reused} messages reused from an earlier run in {tmp}")
    if postfix:
        print(f"postfix postqueue -p: {postfix[1]:.2f}s for {args.messages} held messages "
              f"(filled through smtpd in {postfix[0]:.0f}s)")
    if args.json:
        def median(runs: list[tuple[float, float]]) -> float | None:
            return sorted(t for t, _ in runs)[len(runs) // 2] if runs else None
        write_json(args.json, {"ok": not failed and bool(full), "messages": args.messages,
                               "greeting": max((r["greeting"] for r in (full, again) if r), default=None),
                               "loaded": max((r["loaded"] for r in (full, again) if r), default=None),
                               "rss_mib": max((r["rss_settled"]["VmHWM"] / 1024 for r in (full, again) if r), default=None),
                               "list_running": median(listing_running), "list_stopped": median(listing_stopped),
                               "postqueue": postfix[1] if postfix else None})
    return 1 if failed or not full else 0


if __name__ == "__main__":
    sys.exit(main())
