#!/usr/bin/env python3
"""Where one SMTP session's time goes: the latency of each step, mailhost against Postfix.

    .venv/bin/python bench/session_steps.py [--messages 500] [--only mailhost|postfix] [--workers N]

One client, one message per connection, 4 KiB body, no pipelining: connect
until the 220, then EHLO, MAIL, RCPT, DATA, the body until its 250, and QUIT
until the server closes. Prints the median and mean of each step. Both
servers are set up as bench/inbound.py does (same helpers), so run it as root
from the repository root. For mailhost the 250 after the body comes after the
fsyncs; for Postfix after its queue file's (delivery into the Maildir follows).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inbound  # noqa: E402

STEPS = ["connect+220", "EHLO", "MAIL", "RCPT", "DATA", "body->250", "QUIT+close", "total"]


def body(size: int = 4096) -> bytes:
    line = b"0123456789" * 7 + b"abcdef\r\n"
    text = b"Subject: steps\r\n\r\n" + line * (size // len(line) + 1)
    return text[:size - 2] + b"\r\n.\r\n"


def reply(sock: socket.socket, pending: list[bytes]) -> bytes:
    while True:
        while b"\r\n" not in pending[0]:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            pending[0] += chunk
        line, pending[0] = pending[0].split(b"\r\n", 1)
        if line[3:4] != b"-":
            return line


def session(port: int, data: bytes, times: dict[str, list[float]]) -> None:
    start = time.perf_counter()
    pending = [b""]
    sock = socket.create_connection((inbound.LOOPBACK, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reply(sock, pending)
    last = time.perf_counter()
    times["connect+220"].append(last - start)
    for step, line in [("EHLO", b"EHLO client.test\r\n"), ("MAIL", f"MAIL FROM:<{inbound.SENDER}>\r\n".encode()),
                       ("RCPT", f"RCPT TO:<{inbound.RECIPIENT}>\r\n".encode()), ("DATA", b"DATA\r\n"),
                       ("body->250", data)]:
        sock.sendall(line)
        answer = reply(sock, pending)
        if answer[:1] not in b"23":
            raise RuntimeError(f"{step}: {answer!r}")
        now = time.perf_counter()
        times[step].append(now - last)
        last = now
    sock.sendall(b"QUIT\r\n")
    reply(sock, pending)
    while sock.recv(65536):
        pass
    sock.close()
    now = time.perf_counter()
    times["QUIT+close"].append(now - last)
    times["total"].append(now - start)


def measure(server: inbound.Server, messages: int) -> dict[str, list[float]]:
    data = body()
    for _ in range(50):  # warm up
        session(server.port, data, {step: [] for step in STEPS})
    times: dict[str, list[float]] = {step: [] for step in STEPS}
    for _ in range(messages):
        session(server.port, data, times)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=500)
    p.add_argument("--only", choices=("mailhost", "postfix"))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--venv", type=Path, default=inbound.REPO / ".venv")
    args = p.parse_args()
    servers = [args.only] if args.only else ["mailhost", "postfix"]
    inbound.check_prerequisites(servers, args.venv.resolve() / "bin")
    tmp = Path(tempfile.mkdtemp(prefix="mailhost-steps-"))
    tmp.chmod(0o755)
    results = {}
    try:
        for name in servers:
            if name == "mailhost":
                server = inbound.start_mailhost(tmp / name, args.venv.resolve() / "bin", args.workers)
            else:
                server = inbound.start_postfix(tmp / name)
            try:
                results[name] = measure(server, args.messages)
            finally:
                server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nOne session, {args.messages} messages of 4 KiB, one per connection; milliseconds, median (mean)")
    print("step         " + "".join(f"{name:>20s}" for name in servers))
    for step in STEPS:
        cells = [f"{1000 * statistics.median(results[n][step]):.3f} ({1000 * statistics.mean(results[n][step]):.3f})"
                 for n in servers]
        print(f"{step:12s} " + "".join(f"{c:>20s}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
