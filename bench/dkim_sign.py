#!/usr/bin/env python3
"""DKIM signing cost: messages/s signed in-process, and mailhost's inbound rate with and without a key.

1. In this process: an rsa-sha256 (2048-bit) and an ed25519-sha256 key made with
   mailhost.authn.dkim.generate, and mailhost.authn.dkim.sign() timed on a 4 KiB and
   a 100 KiB newsletter-like message (LF line ends, as mailhost signs them).
2. End to end: `twistd -n mailhost` on loopback, loaded with smtp-source (20
   sessions, 4 KiB bodies, From: bench@example.test, to a local mailbox). The
   client is in relay.networks, so mailhost signs before it queues (and says 250)
   once example.test has a key. Timed once without a key, then again after
   `mailhost dkim keygen example.test --selector bench`, on the same daemon.

Run from the repository root:

    .venv/bin/python bench/dkim_sign.py [--seconds 3] [--messages 2000] [--sessions 20]

See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dkim  # noqa: E402
import dkim.util  # noqa: E402

from common import REPO, Mailhost, cpu_seconds, log, tree_env  # noqa: E402
from inbound import wait_for_delivery  # noqa: E402
from mailhost.authn.dkim import ALGORITHMS, generate, load_key, sign  # noqa: E402
from tests.support.postfix import tail  # noqa: E402

DOMAIN = "example.test"
SELECTOR = "bench"
SENDER = f"bench@{DOMAIN}"  # smtp-source -f: the envelope sender and the From: header
RECIPIENT = f"alice@{DOMAIN}"
SIZES = (4 * 1024, 100 * 1024)


# --- 1. in-process --------------------------------------------------------------------


def prose(size: int, html: bool = False) -> str:
    """Exactly `size` characters of text lines (size >= 1), the last one ending in LF."""
    words = "the quick brown fox jumps over a lazy dog while our team ships new features".split()
    lines: list[str] = []
    length, i = 0, 0
    while length < size:
        line = " ".join(words[(i + k) % len(words)] for k in range(11))
        line = f"<p>{line}</p>" if html else line.capitalize() + "."
        line = line[: size - length - 1] + "\n"
        lines.append(line)
        length += len(line)
        i += 3
    return "".join(lines)


def newsletter(size: int) -> bytes:
    """A campaign message of exactly `size` bytes: the headers a sender sets, text and HTML parts."""
    head = (
        f"From: Example News <news@{DOMAIN}>\n"
        "To: Alice Example <alice@example.org>\n"
        "Subject: Our November newsletter: twelve things worth reading\n"
        f"Date: {formatdate(localtime=True)}\n"
        f"Message-ID: <{time.time_ns()}.newsletter@{DOMAIN}>\n"
        "MIME-Version: 1.0\n"
        f"List-Unsubscribe: <https://{DOMAIN}/unsubscribe?u=alice%40example.org&c=2026-11>,\n"
        f" <mailto:unsubscribe@{DOMAIN}?subject=unsubscribe>\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\n"
        'Content-Type: multipart/alternative; boundary="=_part_1"\n'
        "\n"
        "--=_part_1\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        "\n"
    )
    middle = "--=_part_1\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    end = "--=_part_1--\n"
    room = size - len(head) - len(middle) - len(end)
    text = prose(room // 2)
    message = head + text + middle + prose(room - len(text), html=True) + end
    data = message.encode("utf-8")
    assert len(data) == size, (len(data), size)
    return data


@dataclass
class SigningRate:
    algorithm: str
    size: int
    count: int
    wall: float  # seconds
    cpu: float   # seconds of this process's CPU

    @property
    def rate(self) -> float:
        return self.count / self.wall


def time_signing(state_dir: Path, seconds: float, count: int) -> list[SigningRate]:
    """sign() on each (algorithm, size): `count` times, or for about `seconds` when count is 0."""
    results = []
    for algorithm in ALGORITHMS:
        path, record = generate(state_dir, DOMAIN, f"{SELECTOR}-{algorithm.split('-')[0]}", algorithm)
        key = load_key(path, DOMAIN, path.stem)
        for size in SIZES:
            message = newsletter(size)
            signed = sign(message, key) + message  # warm-up, and proof that it verifies
            if not dkim.verify(signed, dnsfunc=lambda name, timeout=5: record.encode()):
                raise RuntimeError(f"{algorithm}: the signature of a {size}-byte message does not verify")
            n = 0
            wall, cpu = time.perf_counter(), time.process_time()
            deadline = wall + seconds
            while n < count if count else (n == 0 or time.perf_counter() < deadline):
                sign(message, key)
                n += 1
            results.append(SigningRate(algorithm, size, n, time.perf_counter() - wall, time.process_time() - cpu))
            log(f"{algorithm}, {size} bytes: {n} signed in {results[-1].wall:.2f}s")
    return results


# --- 2. end to end ---------------------------------------------------------------------


@dataclass
class InboundRate:
    label: str
    messages: int
    seconds: float    # from starting smtp-source until every message is in Maildir/new
    cpu: float        # the daemon's CPU seconds over that time
    delivered: int
    signed: int       # of those, how many carry a DKIM-Signature by d=example.test

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def start(root: Path, venv_bin: Path) -> Mailhost:
    """common.Mailhost (relay.networks = 127.0.0.1/32), with one local user; up and accepting."""
    daemon = Mailhost(root, venv_bin, nameserver="127.0.0.1:9", mx_port=9)  # nothing is relayed
    config = daemon.config.read_text()
    assert 'greet_pause = "0s"\n' in config
    # As in inbound.py: 20 sessions from one IP must not run into the default limit of 20.
    daemon.config.write_text(config.replace('greet_pause = "0s"\n', 'greet_pause = "0s"\nconnections_per_ip = 1000\n'))
    subprocess.run([str(venv_bin / "mailhost"), "--config", str(daemon.config), "user", "add", RECIPIENT,
                    "--password-stdin"], input="bench-password\n", text=True, capture_output=True, check=True,
                   env=tree_env())
    daemon.start()
    deadline = time.monotonic() + 30
    while not daemon.accepts():
        if not daemon.alive() or time.monotonic() > deadline:
            daemon.stop()
            raise RuntimeError(f"mailhost did not start:\n{tail(daemon.log_file)}")
        time.sleep(0.1)
    log(f"mailhost (pid {daemon.process.pid}) listening on 127.0.0.1:{daemon.port}")
    return daemon


def smtp_source(port: int, messages: int, sessions: int, size: int) -> None:
    cmd = ["smtp-source", "-4", "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-M", "client.test", "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]
    # Without -A, smtp-source exits non-zero on any unexpected reply.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(300.0, messages * 0.1))
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({proc.returncode}): {proc.stdout}{proc.stderr}")


def dkim_signed(path: Path) -> bool:
    """Whether the stored message has a DKIM-Signature: header with d=example.test."""
    head = re.sub(rb"\n[ \t]+", b" ", path.read_bytes().split(b"\n\n", 1)[0])  # unfolded
    return any(dkim.util.parse_tag_value(line.split(b":", 1)[1]).get(b"d") == DOMAIN.encode()
               for line in head.split(b"\n") if line.lower().startswith(b"dkim-signature:"))


def load(daemon: Mailhost, new_dir: Path, label: str, messages: int, sessions: int, size: int,
         stall_timeout: float) -> InboundRate:
    before = set(os.listdir(new_dir)) if new_dir.is_dir() else set()
    cpu = cpu_seconds(daemon.process.pid)
    started = time.monotonic()
    smtp_source(daemon.port, messages, sessions, size)
    wait_for_delivery(new_dir, len(before) + messages, stall_timeout)
    seconds = time.monotonic() - started
    cpu = cpu_seconds(daemon.process.pid) - cpu
    arrived = [new_dir / name for name in os.listdir(new_dir) if name not in before]
    signed = sum(dkim_signed(path) for path in arrived)
    log(f"{label}: {len(arrived)}/{messages} in {seconds:.2f}s ({messages / seconds:.0f} msg/s), {signed} signed")
    return InboundRate(label, messages, seconds, cpu, len(arrived), signed)


def check_one(daemon: Mailhost, new_dir: Path, record: str | None) -> None:
    """One message: its From: is in our domain, and it is signed (verifying against `record`) iff there is a key."""
    before = set(os.listdir(new_dir)) if new_dir.is_dir() else set()
    smtp_source(daemon.port, 1, 1, 100)
    wait_for_delivery(new_dir, len(before) + 1, 30)
    [name] = set(os.listdir(new_dir)) - before
    stored = (new_dir / name).read_bytes()
    headers = stored.split(b"\n\n", 1)[0].lower()
    if f"\nfrom: <{SENDER}>".encode() not in headers:
        raise RuntimeError(f"smtp-source's message has no From: <{SENDER}>:\n{stored[:600].decode(errors='replace')}")
    if record is None:
        if b"\ndkim-signature:" in headers:
            raise RuntimeError("a message is signed although example.test has no key")
    elif not dkim.verify(stored, dnsfunc=lambda name, timeout=5: record.encode()):
        raise RuntimeError(f"the stored message has no DKIM-Signature that verifies:\n{stored[:1500].decode(errors='replace')}")


def keygen(daemon: Mailhost, algorithm: str) -> str:
    """`mailhost dkim keygen example.test --selector bench`; returns the TXT record's value."""
    out = daemon.cli("dkim", "keygen", DOMAIN, "--selector", SELECTOR, "--algorithm", algorithm).stdout
    txt = out.splitlines()[-1]  # bench._domainkey.example.test. IN TXT ( "..." "..." )
    return "".join(s.strip('"') for s in txt[txt.index("(") + 1: txt.rindex(")")].split())


def end_to_end(root: Path, args: argparse.Namespace) -> list[InboundRate]:
    daemon = start(root, args.venv.resolve() / "bin")
    new_dir = root / "mail" / "alice" / "new"
    try:
        def measure(label: str) -> InboundRate:
            if args.warmup:
                load(daemon, new_dir, f"{label} (warm-up)", args.warmup, min(args.sessions, args.warmup), args.size,
                     args.stall_timeout)
            return load(daemon, new_dir, label, args.messages, args.sessions, args.size, args.stall_timeout)

        check_one(daemon, new_dir, None)
        plain = measure("without key")
        check_one(daemon, new_dir, keygen(daemon, args.algorithm))
        return [plain, measure(f"{args.algorithm} key")]
    except Exception:
        log(f"mailhost log tail:\n{tail(daemon.log_file)}")
        raise
    finally:
        daemon.stop()


# --- main ------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="time each in-process combination this long (default 3)")
    p.add_argument("--count", type=int, default=0, help="sign this many times per combination instead")
    p.add_argument("--messages", type=int, default=2000, help="messages per end-to-end run (default 2000)")
    p.add_argument("--sessions", type=int, default=20, help="smtp-source sessions (default 20)")
    p.add_argument("--size", type=int, default=4096, help="smtp-source body bytes (default 4096)")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="rsa-sha256",
                   help="the key for the end-to-end run (default rsa-sha256, 2048 bits)")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured messages before each run (default 50)")
    p.add_argument("--stall-timeout", type=float, default=60.0, help="give up when delivery stalls this long")
    p.add_argument("--only", choices=("sign", "inbound"), help="run one part only")
    p.add_argument("--venv", type=Path, default=REPO / ".venv", help="virtualenv with twistd and mailhost")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.only != "sign" and shutil.which("smtp-source") is None:
        sys.exit("smtp-source not found: tests/ensure-peers installs Postfix's tools")
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))  # so the cleanup runs
    tmp = Path(tempfile.mkdtemp(prefix="mailhost-bench-dkim-"))
    try:
        signing = [] if args.only == "inbound" else time_signing(tmp / "keys", args.seconds, args.count)
        inbound = [] if args.only == "sign" else end_to_end(tmp / "mailhost", args)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    if signing:
        print("\nmailhost.dkim_sign.sign() in one process (newsletter-like message, LF line ends)")
        print(f"{'algorithm':<16}{'size':>8}{'signed':>8}{'msg/s':>9}{'CPU ms/msg':>12}")
        for r in signing:
            print(f"{r.algorithm:<16}{r.size // 1024:>6}Ki{r.count:>8}{r.rate:>9.0f}{1000 * r.cpu / r.count:>12.2f}")
    ok = all(r.delivered == r.messages for r in inbound)
    if inbound:
        print(f"\nmailhost inbound, smtp-source {args.sessions} sessions, {args.size}-byte bodies, relay-network "
              "client (msg/s = messages / seconds until all were in Maildir/new)")
        print(f"{'run':<20}{'msg/s':>7}{'CPU ms/msg':>12}{'delivered':>11}{'signed':>8}")
        for r in inbound:
            print(f"{r.label:<20}{r.rate:>7.0f}{1000 * r.cpu / r.messages:>12.2f}"
                  f"{f'{r.delivered}/{r.messages}':>11}{r.signed:>8}")
        plain, signed = inbound
        print(f"drop with signing: {100 * (1 - signed.rate / plain.rate):.1f}% of msg/s "
              f"(CPU per message {100 * (signed.cpu / plain.cpu - 1):+.0f}%)")
        ok = ok and plain.signed == 0 and signed.signed == signed.messages
        print("verified: every message arrived; none signed without the key, all signed with it" if ok
              else "VERIFICATION FAILED: see the delivered and signed columns")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
