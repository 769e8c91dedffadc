"""Memory per SMTP session: the daemon's resident memory with no sessions and
with N idle ones (greeted and EHLO'd, then silent).

    .venv/bin/python bench/idle_sessions.py [--sessions 1000]

Starts its own mailhost on a free loopback port with a temporary config and
stops it (by PID) at the end. Issue 7's target: 1,000 idle sessions cost
under 100 MB more than none.
"""

from __future__ import annotations

import argparse
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

VENV_BIN = Path(sys.executable).parent

CONFIG = """
[server]
hostname = "mail.example.test"
state_dir = "state"
[[listener]]
role = "mx"
endpoint = "tcp:{port}:interface=127.0.0.1"
[limits]
connections_per_ip = {limit}
greet_pause = "0s"
[relay]
nameservers = ["127.0.0.1:9"]
[[domain]]
name = "example.test"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_listening(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("mailhost did not start listening")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the figures to this file (for bench/targets.py)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.sessions + 100)), hard))
    with tempfile.TemporaryDirectory() as root:
        port = free_port()
        (Path(root) / "mailhost.toml").write_text(CONFIG.format(port=port, limit=args.sessions + 10))
        daemon = subprocess.Popen([str(VENV_BIN / "twistd"), "-n", "--pidfile=", "mailhost", "--config", "mailhost.toml"],
                                  cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        sessions: list[socket.socket] = []
        try:
            wait_listening(port, time.monotonic() + 30)
            time.sleep(1)
            before = rss_mib(daemon.pid)
            for _ in range(args.sessions):
                sessions.append(socket.create_connection(("127.0.0.1", port)))
            for s in sessions:
                assert s.recv(200).startswith(b"220")
            for s in sessions:
                s.sendall(b"EHLO client.test\r\n")
            for s in sessions:
                assert s.recv(2000).startswith(b"250")
            time.sleep(1)
            after = rss_mib(daemon.pid)
        finally:
            for s in sessions:
                s.close()
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=15)
    print(f"mailhost resident memory: {before:.1f} MiB idle, {after:.1f} MiB with {args.sessions} idle sessions "
          f"(+{after - before:.1f} MiB, {(after - before) * 1024 / args.sessions:.1f} KiB per session)")
    if args.json:
        write_json(args.json, {"ok": True, "sessions": args.sessions, "idle_mib": before, "with_mib": after})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
