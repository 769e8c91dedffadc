"""Handles for tests: the SMTP sink as a subprocess, and throwaway TLS material."""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PROJECT = Path(__file__).resolve().parents[2]


class Sink:
    """`python -m tests.support.sink` on a free port of `address`, recording into `record`.

    `script` is the rule list (see sink.py); `port` 0 picks a free one (MX sinks
    share relay.mx_port, so they take a fixed one); other keyword arguments become flags
    (tls_cert="c.pem" -> --tls-cert c.pem, no_pipelining=True -> --no-pipelining).
    """

    def __init__(self, record: Path, address: str = "127.0.0.1", script: list[dict[str, Any]] | None = None,
                 port: int = 0, **options: Any) -> None:
        self.address = address
        self.record = Path(record)
        self.record.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "tests.support.sink", "--listen", f"{address}:{port}", "--record", str(self.record)]
        if script is not None:
            script_path = self.record.parent / f"{self.record.name}-script.json"
            script_path.write_text(json.dumps(script))
            args += ["--script", str(script_path)]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value not in (None, False):
                args += [flag, str(value)]
        self.stderr_path = self.record.parent / f"{self.record.name}-stderr.log"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(args, cwd=PROJECT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.port = self._wait_ready()

    def _wait_ready(self, timeout: float = 15) -> int:
        assert self.process.stdout is not None
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith("ready"):
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"sink did not start: {line} {self.stderr_path.read_text()}")
        return int(line[0].split()[1])

    def messages(self) -> list[dict[str, Any]]:
        """Accepted messages in arrival order; "data" is the unstuffed wire form as a latin-1 string."""
        return [json.loads(path.read_text()) for path in sorted(self.record.glob("[0-9]*.json"))]

    def commands(self) -> list[dict[str, Any]]:
        """Every command line: {"conn", "batch", "tls", "line"}."""
        log = self.record / "commands.log"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def lines(self) -> list[str]:
        return [entry["line"] for entry in self.commands()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca_and_cert(folder: Path, hostname: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signed for `hostname`: paths of ca.pem, cert.pem, key.pem."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("mailhost test CA")).issuer_name(_name("mailhost test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname)).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(key))
    return paths


def make_self_signed(folder: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed certificate for `hostname` (what an MX with no real certificate shows): cert.pem, key.pem."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname)).issuer_name(_name(hostname))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    paths = folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(_pem_key(key))
    return paths
