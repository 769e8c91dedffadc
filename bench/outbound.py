#!/usr/bin/env python3
"""Outbound benchmark: mailhost versus a private Postfix, relaying a full queue.

Each MTA gets the same 5000 messages of 4 KiB, one recipient each, spread
round-robin over 200 domains (d0.test .. d199.test). Every domain's MX is
mx.sink.test, whose A record is the loopback address of Postfix's smtp-sink(1),
served by the test DNS server (tests/support/dns_server.py). The queue is
filled with delivery paused, then released, and the drain is timed until the
sink has counted every message. The two MTAs run one after the other in the
same run, never at the same time.

Run from the repository root, as root:

    .venv/bin/python bench/outbound.py [--messages 5000] [--domains 200] [--size 4096]

See bench/README.md for what exactly is timed and the one difference in
routing between the two.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO, SENDER, Mailhost, SmtpSink, ZoneServer, cpu_seconds, exit_on_signals, fill_spool, log, make_message,
    spool_size, write_json,
)
from tests.support.postfix import Postfix, PostfixError, free_port, tail, unavailable  # noqa: E402

SINK_ADDRESS = "127.0.0.20"  # smtp-sink: every MX
DNS_ADDRESS = "127.0.0.153"  # the test DNS server, port 53 (so Postfix can use it too)
MX_HOST = "mx.sink.test"


@dataclass
class Result:
    name: str
    messages: int
    fill_seconds: float
    load_seconds: float | None  # mailhost: start until "queue loaded"
    drain_seconds: float | None  # release until the sink counted every message
    delivered_logged: int  # status=delivered / status=sent lines in the MTA's log
    left_in_queue: int
    connections: int  # SMTP sessions the sink saw from this MTA
    cpu_seconds: float | None  # CPU the MTA used from release until drained
    sink_cpu_seconds: float | None = None  # CPU smtp-sink used meanwhile (the shared ceiling)
    mx_resolved: int | None = None  # Postfix: deliveries whose relay= names an MX host from DNS, not a fixed [address]

    @property
    def rate(self) -> float | None:
        return self.messages / self.drain_seconds if self.drain_seconds else None

    @property
    def ok(self) -> bool:
        return self.drain_seconds is not None and self.delivered_logged == self.messages and self.left_in_queue == 0


def recipient(domains: int):
    return lambda i: f"user{i}@d{i % domains}.test"


# --- mailhost ----------------------------------------------------------------------------


def flush_mailhost(daemon: Mailhost) -> None:
    """`mailhost queue flush`, sent from this process (no CLI start-up in the timing)."""
    try:
        from mailhost.doors.control import send_queue_command
    except ImportError:
        daemon.cli("queue", "flush")
        return
    send_queue_command(daemon.state_dir, "flush", None)


def run_mailhost(root: Path, args, sink: SmtpSink, nameserver: str) -> Result:
    # (always written: the default is "auto", one process per core)
    daemon = Mailhost(root, args.venv / "bin", nameserver=nameserver, mx_port=sink.port, retry=["1h"],
                      queue_extra="\n".join(args.mailhost_queue), profile=args.profile,
                      server_extra=f"workers = {args.workers}")
    log(f"mailhost: writing {args.messages} messages into its spool (daemon stopped) ...")
    fill = fill_spool(daemon.spool_dir, args.messages, recipient(args.domains), args.size,
                      next_attempt=time.time() + 86400, progress=False)
    log(f"  written in {fill:.1f}s")
    try:
        started = daemon.start()
        # With workers, each process loads its own shard of the queue and says so.
        found = daemon.wait_for_log(r"(?s)(queue loaded: \d+ messages.*){%d}" % args.workers, timeout=300)
        loaded = time.monotonic() - started
        total = sum(int(n) for n in re.findall(r"queue loaded: (\d+) messages", daemon.log()))
        if total != args.messages:
            raise RuntimeError(f"mailhost loaded {total} messages, not {args.messages}")
        while not daemon.accepts():
            time.sleep(0.05)
        log(f"mailhost (pid {daemon.process.pid}) loaded its queue in {loaded:.2f}s; flushing")
        base, sessions = sink.messages, sink.sessions
        cpu0, sink0 = cpu_seconds(daemon.process.pid, children=True), cpu_seconds(sink.process.pid)
        main0 = cpu_seconds(daemon.process.pid)
        t0 = time.monotonic()
        flush_mailhost(daemon)
        end = sink.wait_for(base + args.messages, t0, args.stall_timeout)
        drain = end - t0 if end is not None else None
        cpu, sink_cpu = cpu_seconds(daemon.process.pid, children=True) - cpu0, cpu_seconds(sink.process.pid) - sink0
        if args.workers > 1:
            log(f"  main process {cpu_seconds(daemon.process.pid) - main0:.1f} of the {cpu:.1f} CPU-s")
        if drain is None:
            log(f"  STALLED at {sink.messages - base}/{args.messages}; log tail:\n{tail(daemon.log_file)}")
        deadline = time.monotonic() + 60
        while (left := spool_size(daemon.spool_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        delivered = len(re.findall(r" status=delivered ", daemon.log()))
    finally:
        daemon.stop()
    time.sleep(0.5)  # the sink counts a session when it ends
    return Result("mailhost", args.messages, fill, loaded, drain, delivered, left, sink.sessions - sessions, cpu, sink_cpu)


# --- Postfix -------------------------------------------------------------------------------


def held_count(instance: Postfix) -> int:
    count = 0
    for _, _, files in os.walk(instance.queue / "hold"):
        count += len(files)
    return count


def queued_count(instance: Postfix) -> int:
    count = 0
    for name in ("incoming", "active", "deferred", "hold", "maildrop"):
        for _, _, files in os.walk(instance.queue / name):
            count += len(files)
    return count


def fill_postfix(instance: Postfix, count: int, domains: int, size: int, connections: int = 4) -> None:
    rcpt = recipient(domains)

    def send(part: int) -> None:
        with smtplib.SMTP(instance.address, instance.port, timeout=60) as client:
            client.ehlo("client.example.test")
            for i in range(part, count, connections):
                client.sendmail(SENDER, [rcpt(i)], make_message(i, rcpt(i), size))

    with ThreadPoolExecutor(connections) as pool:
        for _ in pool.map(send, range(connections)):
            pass


def postfix_settings(args, sink: SmtpSink, routing: str, root: Path) -> list[str]:
    settings = [
        # Filling: every message accepted goes to the hold queue (HOLD does not
        # end the restriction list), and smtpd does not slow down for a queue
        # that is not draining (in_flow_delay only throttles smtpd).
        "smtpd_recipient_restrictions = check_recipient_access static:HOLD, permit_mynetworks, "
        "reject_unauth_destination",
        "in_flow_delay = 0s",
        # Delivery: Postfix's own defaults (100 smtp processes, 20 per
        # destination, connection cache on demand), no TLS (the sink has none).
        f"smtp_tcp_port = {sink.port}",
    ]
    if routing == "transport":
        table = root / "transport"
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text("".join(f"d{n}.test smtp:[{sink.address}]:{sink.port}\n" for n in range(args.domains)))
        settings.append(f"transport_maps = texthash:{table}")
    return settings


def run_postfix(root: Path, args, sink: SmtpSink, routing: str) -> Result:
    instance = Postfix(root / "instance", listen="127.0.0.1:0", hostname="mta.postfix.test",
                       resolver=DNS_ADDRESS if routing == "dns" else None,
                       settings=postfix_settings(args, sink, routing, root / "maps"))
    try:
        instance.start()
        log(f"postfix (master pid {instance.master_pid}): injecting {args.messages} messages on hold "
            f"through its smtpd ...")
        t = time.monotonic()
        fill_postfix(instance, args.messages, args.domains, args.size)
        deadline = time.monotonic() + 120
        while held_count(instance) < args.messages and time.monotonic() < deadline:
            time.sleep(0.1)
        fill = time.monotonic() - t
        if held_count(instance) != args.messages:
            raise RuntimeError(f"postfix holds {held_count(instance)} messages, not {args.messages}")
        log(f"  {args.messages} on hold after {fill:.1f}s; releasing (postsuper -H ALL; postqueue -f)")
        base, sessions = sink.messages, sink.sessions
        cpu0, sink0 = cpu_seconds(instance.master_pid, children=True), cpu_seconds(sink.process.pid)
        t0 = time.monotonic()
        instance.postsuper("-H", "ALL")
        instance.postqueue("-f")
        end = sink.wait_for(base + args.messages, t0, args.stall_timeout)
        drain = end - t0 if end is not None else None
        # postsuper and postqueue are not the master's children: not counted (they are short).
        cpu, sink_cpu = cpu_seconds(instance.master_pid, children=True) - cpu0, cpu_seconds(sink.process.pid) - sink0
        if drain is None:
            log(f"  STALLED at {sink.messages - base}/{args.messages}; maillog tail:\n{tail(instance.log_file)}")
        deadline = time.monotonic() + 60
        while (left := queued_count(instance)) and time.monotonic() < deadline:
            time.sleep(0.2)
        delivered = len(re.findall(r" status=sent ", instance.log()))
        resolved = mx_resolved(instance.log())
        log(f"  Postfix delivered {resolved} of {delivered} through an MX host it looked up in the test DNS")
    finally:
        instance.stop()
    time.sleep(0.5)
    return Result("postfix", args.messages, fill, None, drain, delivered, left, sink.sessions - sessions, cpu, sink_cpu,
                  resolved)


def mx_resolved(maillog: str) -> int:
    """Deliveries whose relay= is a host name from an MX lookup ("mx.sink.test[127.0.0.20]"),
    not a transport_maps next hop ("127.0.0.20[127.0.0.20]")."""
    return sum(1 for name in re.findall(r" relay=([^\[\s,]+)\[[^\]]*\][^ ]*, .* status=sent ", maillog)
               if not re.fullmatch(r"[\d.]+", name))


# --- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=5000, help="messages per MTA (default 5000)")
    p.add_argument("--domains", type=int, default=200, help="recipient domains, round-robin (default 200)")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    p.add_argument("--only", choices=("mailhost", "postfix"), help="run one MTA only (no ratio)")
    p.add_argument("--postfix-routing", choices=("dns", "transport"), default="dns",
                   help="dns (default): Postfix asks the same test DNS server through a private "
                        "resolv.conf; transport: a transport_maps table instead")
    p.add_argument("--mx-hosts", choices=("shared", "per-domain"), default="shared",
                   help="shared (default): every domain's MX is mx.sink.test; per-domain: d<n>.test has its "
                        "own MX host mx<n>.d<n>.test (all on the sink's address), as distinct receivers have")
    p.add_argument("--stall-timeout", type=float, default=60.0,
                   help="give up when the sink counts nothing new for this long (default 60 s)")
    p.add_argument("--venv", type=Path, default=REPO / ".venv", help="virtualenv with twistd and mailhost")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, maillog)")
    p.add_argument("--profile", type=Path, help="run mailhost under cProfile, stats saved to this file")
    p.add_argument("--json", type=Path, help="also write the figures to this file (for bench/targets.py)")
    p.add_argument("--workers", type=int, default=1,
                   help="mailhost's [server] workers: processes that each deliver a shard of the queue (default 1)")
    p.add_argument("--mailhost-queue", action="append", default=[], metavar="'KEY = VALUE'",
                   help="an extra line for mailhost's [queue] table, e.g. 'per_destination = 50' (repeatable)")
    return p.parse_args()


def check_prerequisites(args) -> None:
    reason = unavailable()
    if reason:
        sys.exit(f"bench/outbound.py: {reason}")
    if shutil.which("smtp-sink") is None:
        sys.exit("smtp-sink not found: run tests/ensure-peers (Debian's postfix package)")
    for tool in ("twistd", "mailhost"):
        if not (args.venv / "bin" / tool).exists():
            sys.exit(f"{args.venv / 'bin' / tool} missing: make venv")


def print_table(results: dict[str, Result], args, routing: str) -> None:
    scenario = f"{args.messages} x {args.size} B, {args.domains} domains, 1 rcpt/msg"
    if args.mailhost_queue:
        scenario += f" (mailhost: {', '.join(args.mailhost_queue)})"
    m, p = results.get("mailhost"), results.get("postfix")

    def rate(r: Result | None) -> str:
        return f"{r.rate:.0f}" if r and r.rate else "-"

    ratio = f"{m.rate / p.rate:.2f}" if m and p and m.rate and p.rate else "-"
    verified = "no (not run)" if not results else "yes" if all(r.ok for r in results.values()) else "NO: " + ", ".join(
        f"{r.name} sink-timed={'yes' if r.drain_seconds else 'no'} logged={r.delivered_logged} left={r.left_in_queue}"
        for r in results.values() if not r.ok)
    rows = [("scenario", "mailhost msg/s", "postfix msg/s", "ratio m/p", "all verified"),
            (scenario, rate(m), rate(p), ratio, verified)]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print(f"\nOutbound: a full queue relayed to smtp-sink on {SINK_ADDRESS} (loopback); "
          "msg/s = messages / seconds from release until the sink counted them all")
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j in (0, 4) else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for r in results.values():
        extra = f", queue loaded {r.load_seconds:.2f}s after start" if r.load_seconds is not None else ""
        drain = f"{r.drain_seconds:.2f}s" if r.drain_seconds else "did not finish"
        cpu = ""
        if r.cpu_seconds is not None and r.drain_seconds:
            cpu = f", {r.cpu_seconds:.1f} CPU-s ({100 * r.cpu_seconds / r.drain_seconds:.0f}% of one core)"
            if r.sink_cpu_seconds is not None:
                cpu += f", smtp-sink {r.sink_cpu_seconds:.1f} CPU-s"
        print(f"  {r.name}: drained in {drain} over {r.connections} SMTP connections{cpu}{extra}; "
              f"queue filled in {r.fill_seconds:.1f}s (not timed)")
    if routing == "dns":
        print("Routing: both resolve every domain's MX through the same test DNS server "
              f"({DNS_ADDRESS}:53, TTL 300); Postfix's smtp client runs chrooted with a private "
              "resolv.conf naming it (its libc resolver cannot use another port). No transport_maps.")
    else:
        print("Routing DIFFERS: mailhost resolves MX through the test DNS server; Postfix uses "
              f"transport_maps (dN.test smtp:[{SINK_ADDRESS}]:PORT), so it does no DNS and sees "
              "one next hop for all domains.")


def zone_records(domains: int, mx_hosts: str) -> list[list[str]]:
    """Each d<n>.test's MX: the one shared host, or a host of its own; every MX host is the sink's address."""
    if mx_hosts == "shared":
        return [*([f"d{n}.test", "MX", f"10 {MX_HOST}"] for n in range(domains)), [MX_HOST, "A", SINK_ADDRESS]]
    records = []
    for n in range(domains):
        records += [[f"d{n}.test", "MX", f"10 mx{n}.d{n}.test"], [f"mx{n}.d{n}.test", "A", SINK_ADDRESS]]
    return records


def main() -> int:
    args = parse_args()
    args.venv = args.venv.resolve()
    if args.profile:
        args.profile = args.profile.resolve()
    check_prerequisites(args)
    exit_on_signals()

    tmp = Path(tempfile.mkdtemp(prefix="mailhost-bench-outbound-"))
    records = zone_records(args.domains, args.mx_hosts)
    results: dict[str, Result] = {}
    routing = args.postfix_routing
    dns = sink = None
    failed = False
    try:
        try:
            dns = ZoneServer(tmp / "dns", records, DNS_ADDRESS, 53)
        except RuntimeError as e:
            if routing == "dns" and args.only != "mailhost":
                log(f"{e}\nfalling back to --postfix-routing transport (and a DNS port of its own for mailhost)")
            routing = "transport"
            dns = ZoneServer(tmp / "dns", records, "127.0.0.1", 0)
        log(f"test DNS server on {dns.nameserver}: {args.domains} domains, MX hosts {args.mx_hosts} -> {SINK_ADDRESS}")
        sink = SmtpSink(SINK_ADDRESS, free_port(SINK_ADDRESS))
        log(f"smtp-sink (pid {sink.process.pid}) on {SINK_ADDRESS}:{sink.port}")
        for name in (["mailhost", "postfix"] if not args.only else [args.only]):
            if name == "mailhost":
                r = run_mailhost(tmp / "mailhost", args, sink, dns.nameserver)
            else:
                r = run_postfix(tmp / "postfix", args, sink, routing)
            results[name] = r
            log(f"{name}: " + (f"drained {r.messages} in {r.drain_seconds:.2f}s ({r.rate:.0f} msg/s)"
                               if r.drain_seconds else "did not drain")
                + f"; log says {r.delivered_logged} delivered; {r.left_in_queue} left in queue")
            failed |= not r.ok
    except (RuntimeError, PostfixError, subprocess.SubprocessError, OSError) as exc:
        failed = True
        log(f"error: {exc}")
    finally:
        for thing in (sink, dns):
            if thing is not None:
                thing.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(results, args, routing)
    if args.json:
        write_json(args.json, {"workers": args.workers, "ok": not failed and all(r.ok for r in results.values()),
                               "routing": routing, "mx_hosts": args.mx_hosts,
                               **{name: r.rate for name, r in results.items()}})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
