"""`DNSServer`: the test DNS server (tests/support/dns_server.py) as a subprocess.

    with DNSServer([["remote.test", "MX", "10 mx1.remote.test"],
                    ["mx1.remote.test", "A", "127.0.0.5"]]) as server:
        ...  # relay.nameservers = [f"127.0.0.1:{server.port}"]
        server.update([...])  # new records, served once update() returns

The server picks its own port (free for both UDP and TCP, so no race with
other tests) and reports it; `port` is valid after start().
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the project: `python -m tests.support.dns_server` runs from here

Record = Sequence  # [name, type, value]


class DNSServer:
    def __init__(self, records: Iterable[Record] = (), servfail: Iterable[str] = (), timeout: Iterable[str] = (),
                 host: str = "127.0.0.1", ttl: int = 0) -> None:
        self.records = [list(r) for r in records]
        self.ttl = ttl
        self.servfail = list(servfail)
        self.timeout = list(timeout)
        self.host = host
        self.port: int | None = None
        self._dir: Path | None = None
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    @property
    def nameserver(self) -> str:
        """The address as relay.nameservers takes it ("127.0.0.1:5353" / "[::1]:5353")."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def _write_zone(self) -> None:
        assert self._dir is not None
        zone = self._dir / "zone.json"
        temporary = self._dir / "zone.json.tmp"
        temporary.write_text(json.dumps({"records": self.records, "servfail": self.servfail, "timeout": self.timeout, "ttl": self.ttl}))
        os.replace(temporary, zone)

    def _read(self, stream) -> None:
        for line in stream:
            self._lines.put(line.strip())
        self._lines.put(None)

    def _expect(self, prefix: str, timeout: float) -> str:
        try:
            while True:
                line = self._lines.get(timeout=timeout)
                if line is None:
                    raise RuntimeError(f"the DNS test server exited: {self._stderr().strip()}")
                if line.startswith("reload failed"):
                    raise RuntimeError(f"the DNS test server says: {line}")
                if line.startswith(prefix):
                    return line
        except queue.Empty:
            raise RuntimeError(f"the DNS test server did not say {prefix!r} within {timeout}s") from None

    def _stderr(self) -> str:
        try:
            return (self._dir / "stderr").read_text() if self._dir else ""
        except OSError:
            return ""

    def start(self, timeout: float = 20.0) -> DNSServer:
        self._dir = Path(tempfile.mkdtemp(prefix="dns-test-"))
        self._write_zone()
        host = f"[{self.host}]" if ":" in self.host else self.host
        with open(self._dir / "stderr", "wb") as stderr:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.dns_server", "--listen", f"{host}:0", "--zone",
                 str(self._dir / "zone.json"), "--queries", str(self._dir / "queries")],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )
        threading.Thread(target=self._read, args=(self._process.stdout,), daemon=True).start()
        try:
            self.port = int(self._expect("ready", timeout).split()[1])
        except BaseException:
            self.stop()
            raise
        return self

    def update(self, records: Iterable[Record] | None = None, servfail: Iterable[str] | None = None,
               timeout: Iterable[str] | None = None) -> None:
        """Replace the records (and the servfail/timeout names, when given); served on return."""
        if records is not None:
            self.records = [list(r) for r in records]
        if servfail is not None:
            self.servfail = list(servfail)
        if timeout is not None:
            self.timeout = list(timeout)
        assert self._process is not None, "start() first"
        self._write_zone()
        self._process.send_signal(signal.SIGHUP)
        self._expect("reloaded", 10.0)

    def queries(self) -> list[tuple[str, str]]:
        """Every query answered so far, in order: (name, type), e.g. ("remote.test", "MX")."""
        assert self._dir is not None, "start() first"
        try:
            text = (self._dir / "queries").read_text(encoding="ascii")
        except FileNotFoundError:
            return []
        return [tuple(line.split(" ", 1)) for line in text.splitlines()]  # type: ignore[misc]

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
