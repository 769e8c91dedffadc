#!/usr/bin/env python3
"""Every throughput target in one table: mailhost and Postfix side by side, and the ratio.

Runs the other benchmarks in turn (never two at once), each with --json, and
prints one row per target:

    inbound.py     20 sessions (1 msg/conn, reused), 1 session     >= 2.0x, 2.0x, 1.0x Postfix
    outbound.py    5000 queued x 4 KiB to 200 domains               >= 1.5x Postfix
    campaign.py    10,000 x 4 KiB, 10 AUTH conns, DKIM, 100 MX      >= 1.5x Postfix + OpenDKIM
    queue_scale.py 100,000 queued: ready, resident, `queue list`   < 10 s, < 300 MB, < 5 s
    idle_sessions.py  1,000 idle sessions                          < 100 MB more than none

Run from the repository root, as root, after `make venv` and `tests/ensure-peers`:

    .venv/bin/python bench/targets.py [--workers 2] [--queue-dir DIR] [--postfix-queue]

--queue-dir keeps (and reuses) queue_scale.py's 100,000-message spool, which
takes minutes to write; --postfix-queue also times Postfix's `postqueue -p`
on as many held messages (more minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, arguments: list[str], out: Path) -> dict:
    """One benchmark with --json; its figures (its own output goes to the terminal as it runs)."""
    command = [sys.executable, str(HERE / script), *arguments, "--json", str(out)]
    print(f"[targets] {' '.join(command[1:])}", file=sys.stderr, flush=True)
    finished = subprocess.run(command, stdout=sys.stderr)
    try:
        figures = json.loads(out.read_text())
    except (OSError, ValueError):
        figures = {"ok": False}
    figures["ok"] = figures.get("ok", False) and finished.returncode == 0
    return figures


def ratio(ours: float | None, theirs: float | None) -> str:
    return f"{ours / theirs:.2f}" if ours and theirs else "-"


def number(value: float | None, unit: str = "", digits: int = 0) -> str:
    return f"{value:.{digits}f}{unit}" if value is not None else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="mailhost's [server] workers (default 2)")
    parser.add_argument("--queue-dir", type=Path, help="queue_scale.py's --dir: keep and reuse its spool")
    parser.add_argument("--postfix-queue", action="store_true", help="also time postqueue -p (queue_scale.py --postfix)")
    args = parser.parse_args()
    workers = ["--workers", str(args.workers)]
    with tempfile.TemporaryDirectory(prefix="mailhost-targets-") as folder:
        out = Path(folder)
        inbound = run("inbound.py", workers, out / "inbound.json")
        outbound = run("outbound.py", workers, out / "outbound.json")
        campaign = run("campaign.py", workers, out / "campaign.json")
        queue = run("queue_scale.py", [*(["--dir", str(args.queue_dir)] if args.queue_dir else []),
                                       *(["--postfix"] if args.postfix_queue else [])], out / "queue.json")
        idle = run("idle_sessions.py", [], out / "idle.json")

    rows: list[tuple[str, ...]] = [("target", "goal", "mailhost", "postfix", "ratio m/p", "met")]
    scenarios = inbound.get("scenarios", {})
    for name, goal in (("20 sessions, 1 msg/conn", 2.0), ("20 sessions, reused conn (-d)", 2.0),
                       ("1 session, 1 msg/conn", 1.0)):
        m, p = scenarios.get(name, {}).get("mailhost"), scenarios.get(name, {}).get("postfix")
        met = "yes" if m and p and m / p >= goal else "no"
        rows.append((f"inbound, {name}, msg/s", f">= {goal:.1f}x", number(m), number(p), ratio(m, p), met))
    m, p = outbound.get("mailhost"), outbound.get("postfix")
    # Only a Postfix that looked each MX up itself is the production comparison.
    routed = outbound.get("routing", "dns") == "dns"
    rows.append((f"outbound, 5000 queued to 200 domains, msg/s{'' if routed else ' (postfix: fixed next hop)'}",
                 ">= 1.5x", number(m), number(p), ratio(m, p), "yes" if m and p and m / p >= 1.5 and routed else "no"))
    m, p = campaign.get("mailhost"), campaign.get("postfix")
    rows.append(("campaign, 10,000 via 587 + DKIM to 100 MX, msg/s (vs Postfix + OpenDKIM)", ">= 1.5x", number(m),
                 number(p), ratio(m, p), "yes" if m and p and m / p >= 1.5 else "no"))
    count = queue.get("messages", 100000)
    for label, key, goal, limit, unit, digits in (
            (f"{count:,} queued: ready for SMTP", "greeting", "< 10 s", 10.0, " s", 2),
            (f"{count:,} queued: peak resident", "rss_mib", "< 300 MB", 286.0, " MiB", 0),  # 300 MB = 286 MiB
            (f"{count:,} queued: queue list --json, running", "list_running", "< 5 s", 5.0, " s", 2),
            (f"{count:,} queued: queue list --json, stopped", "list_stopped", "< 5 s", 5.0, " s", 2)):
        value = queue.get(key)
        theirs = number(queue.get("postqueue"), " s", 2) if key.startswith("list") else "-"
        rows.append((label, goal, number(value, unit, digits), theirs,
                     ratio(value, queue.get("postqueue")) if key.startswith("list") else "-",
                     "yes" if value is not None and value < limit else "no"))
    growth = idle["with_mib"] - idle["idle_mib"] if "with_mib" in idle else None
    rows.append((f"{idle.get('sessions', 1000):,} idle sessions: memory added", "< 100 MB", number(growth, " MiB", 1),
                 "-", "-", "yes" if growth is not None and growth < 95.4 else "no"))  # 100 MB = 95.4 MiB

    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"\nmailhost (workers = {args.workers}) against Postfix, every target of the throughput issue:")
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    broken = [name for name, figures in (("inbound", inbound), ("outbound", outbound), ("campaign", campaign),
                                         ("queue_scale", queue),
                                         ("idle_sessions", idle)) if not figures.get("ok")]
    if broken:
        print(f"not verified (see their output above): {', '.join(broken)}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
