"""A DNSSEC-signed test zone behind a real validating resolver, for DANE tests.

    with ValidatingDNS(folder, "dane.test", ["good IN MX 10 mx.dane.test.", ...]) as dns:
        ...  # relay.nameservers = [dns.nameserver]: unbound, validating with the zone's DS

The zone is signed with ldns-signzone (keys from ldns-keygen, ECDSA P-256), served by
nsd, and resolved by unbound with the zone's DS as its only trust anchor (and a stub
zone to nsd: nothing leaves the machine). Both run in the foreground as our children
on 127.0.0.1, stopped by PID. Debian packages: nsd, unbound, ldnsutils (tests/ensure-peers).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

TOOLS = ("nsd", "unbound", "ldns-keygen", "ldns-signzone")


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port(host: str) -> int:
    """A port free for both UDP and TCP on `host` right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


class ValidatingDNS:
    def __init__(self, folder: Path, zone: str, records: Iterable[str], host: str = "127.0.0.1") -> None:
        self.folder = folder
        self.zone = zone
        self.records = list(records)
        self.host = host
        self.port = 0  # unbound's
        self._processes: list[subprocess.Popen] = []

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    def _sign(self) -> Path:
        folder = self.folder
        zone_file = folder / f"{self.zone}.zone"
        zone_file.write_text("\n".join([
            f"$ORIGIN {self.zone}.", "$TTL 60",
            f"@ IN SOA ns.{self.zone}. hostmaster.{self.zone}. 1 3600 600 86400 60",
            f"@ IN NS ns.{self.zone}.", f"ns IN A {self.host}", *self.records, ""]))

        def keygen(*flags: str) -> str:
            return subprocess.run([_tool("ldns-keygen"), "-a", "ECDSAP256SHA256", *flags, self.zone], cwd=folder,
                                  check=True, capture_output=True, text=True).stdout.strip()

        ksk, zsk = keygen("-k"), keygen()
        subprocess.run([_tool("ldns-signzone"), "-n", str(zone_file), ksk, zsk], cwd=folder, check=True,
                       capture_output=True)
        return folder / f"{ksk}.ds"

    def start(self) -> ValidatingDNS:
        self.folder.mkdir(parents=True, exist_ok=True)
        anchor = self._sign()
        folder = self.folder
        nsd_port, self.port = _free_port(self.host), _free_port(self.host)
        (folder / "nsd.conf").write_text(f"""server:
  ip-address: {self.host}@{nsd_port}
  port: {nsd_port}
  username: ""
  chroot: ""
  zonesdir: "{folder}"
  database: ""
  zonelistfile: "{folder}/zone.list"
  xfrdfile: "{folder}/xfrd.state"
  xfrdir: "{folder}"
  pidfile: "{folder}/nsd.pid"
  logfile: "{folder}/nsd.log"
  do-ip6: no
  server-count: 1
remote-control:
  control-enable: no
zone:
  name: {self.zone}
  zonefile: "{folder}/{self.zone}.zone.signed"
""")
        (folder / "unbound.conf").write_text(f"""server:
  interface: {self.host}@{self.port}
  port: {self.port}
  username: ""
  chroot: ""
  directory: "{folder}"
  pidfile: "{folder}/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 1
  do-ip6: no
  num-threads: 1
  do-not-query-localhost: no
  access-control: 127.0.0.0/8 allow
  trust-anchor-file: "{anchor}"
  local-zone: "test." nodefault
  qname-minimisation: no
  module-config: "validator iterator"
stub-zone:
  name: "{self.zone}"
  stub-addr: {self.host}@{nsd_port}
remote-control:
  control-enable: no
""")
        try:
            for command, name in (([_tool("nsd"), "-d", "-c", str(folder / "nsd.conf")], "nsd"),
                                  ([_tool("unbound"), "-d", "-c", str(folder / "unbound.conf")], "unbound")):
                with open(folder / f"{name}.out", "wb") as out:
                    self._processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))
            self._wait(nsd_port)
            self._wait(self.port)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited: {self.log()}")
            try:
                with socket.create_connection((self.host, port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nothing listens on {self.host}:{port}: {self.log()}")

    def log(self) -> str:
        return "".join((self.folder / f"{name}.out").read_text(errors="replace")
                       for name in ("nsd", "unbound") if (self.folder / f"{name}.out").exists())

    def stop(self) -> None:
        processes, self._processes = self._processes, []
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> ValidatingDNS:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
