"""A private CA for tests that issues server certificates (MTA-STS, DANE), and
`PolicyServer`, the handle of tests/support/policy_server.py."""

from __future__ import annotations

import datetime
import hashlib
import signal
import subprocess
import sys
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PROJECT = Path(__file__).resolve().parents[2]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class TestCA:
    """One CA (ca.pem in `folder`) and the certificates it issues."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path, name: str = "mailhost test CA") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / "ca.pem"
        self.path.write_bytes(self.pem)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, label: str, *names: str, expired: bool = False, with_ca: bool = False) -> tuple[Path, Path]:
        """A server certificate for `names` (cert.pem with the CA after it when `with_ca`, key.pem)."""
        now = datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)) if expired else (
            now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0])).issuer_name(self.certificate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = self.folder / f"{label}.cert.pem", self.folder / f"{label}.key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + (self.pem if with_ca else b""))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


def spki_sha256(cert_path: Path) -> str:
    """The TLSA 3 1 1 data of the first certificate in `cert_path`."""
    cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def cert_sha256(pem: bytes) -> str:
    """The TLSA x 0 1 data of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


class PolicyServer:
    """`python -m tests.support.policy_server` on `address` (port 0: a free one)."""

    def __init__(self, root: Path, address: str, cert: Path, key: Path, port: int = 0) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.stderr_path = root / "stderr.log"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.policy_server", "--listen", f"{address}:{port}",
                 "--cert", str(cert), "--key", str(key), "--root", str(root)],
                cwd=PROJECT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(15)
        if not line or not line[0].startswith("ready"):
            self.stop()
            raise RuntimeError(f"policy server did not start: {line} {self.stderr_path.read_text()}")
        self.port = int(line[0].split()[1])

    def publish(self, host: str, policy: str) -> None:
        path = self.root / f"{host}.txt"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(policy)
        temporary.replace(path)

    def requests(self) -> list[str]:
        log = self.root / "requests.log"
        return log.read_text().splitlines() if log.exists() else []

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
