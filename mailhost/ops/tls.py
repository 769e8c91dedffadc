"""The server's TLS identity: the configured pair, or a self-signed one made on first start."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

from mailhost.config import Config
from mailhost.ops.durable import write_file_atomically
from mailhost.ops.ownership import give, make_dirs, owner_of


class TLSSetupError(Exception):
    """The certificate or key cannot be used; str(error) says which file and why."""


def tls_pair_paths(config: Config) -> tuple[Path, Path]:
    """The certificate and key files in use: configured, or the generated pair's place."""
    if config.server.tls_cert and config.server.tls_key:
        return config.server.tls_cert, config.server.tls_key
    folder = config.server.state_dir / "tls"
    return folder / "cert.pem", folder / "key.pem"


def ensure_tls_pair(config: Config) -> tuple[Path, Path]:
    """Generate the self-signed pair in state_dir/tls when no pair is configured and none exists yet.

    The daemon does this as root, before twistd's --uid: the generated pair is given to the owner
    of state_dir, so that a SIGHUP afterwards can read it again (also a pair an earlier version
    left root's). A configured pair is never touched."""
    cert_path, key_path = tls_pair_paths(config)
    if config.server.tls_cert is not None:
        return cert_path, key_path
    owner = owner_of(config.server.state_dir)
    if not (cert_path.exists() and key_path.exists()):
        cert_pem, key_pem = self_signed_pair(config.server.hostname)
        make_dirs(cert_path.parent, 0o700, owner)
        write_file_atomically(key_path, key_pem, mode=0o600, owner=owner)
        write_file_atomically(cert_path, cert_pem, mode=0o644, owner=owner)
    for path in (cert_path.parent, key_path, cert_path):
        give(path, owner)
    return cert_path, key_path


def self_signed_pair(hostname: str) -> tuple[bytes, bytes]:
    """A PEM certificate and key for `hostname`, valid ten years."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def read_tls_pair(cert_path: Path, key_path: Path) -> tuple[bytes, bytes]:
    """The PEM bytes of the certificate (chain) file and the key file."""
    try:
        return cert_path.read_bytes(), key_path.read_bytes()
    except OSError as e:
        raise TLSSetupError(f"{e.filename}: cannot read: {e.strerror}") from None


def server_tls_options(cert_path: Path, key_path: Path) -> ssl.CertificateOptions:
    """Twisted TLS options for the server side: TLS 1.2 or newer."""
    return tls_options_from_pem(*read_tls_pair(cert_path, key_path), cert_path, key_path)


def tls_options_from_pem(cert_pem: bytes, key_pem: bytes, cert_path: Path, key_path: Path) -> ssl.CertificateOptions:
    """The same from PEM bytes already read (the paths only name them in errors)."""
    try:
        pair = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        # A full chain file: the first certificate is ours, the rest intermediates.
        chain = [ssl.Certificate.loadPEM(block).original for block in _pem_blocks(cert_pem)[1:]]
    except Exception as e:  # OpenSSL's errors have no common base worth naming
        raise TLSSetupError(f"{cert_path} / {key_path}: not a usable PEM certificate and key ({e})") from None
    return ssl.CertificateOptions(
        privateKey=pair.privateKey.original,
        certificate=pair.original,
        extraCertChain=chain,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """The server's TLS options, rebuilt from the files by `reload` (SIGHUP).

    Listeners and STARTTLS hold this object, not the options: each new TLS
    connection asks for the context at its start and so gets the newest pair,
    while sessions already running keep theirs.

    `pem` keeps the bytes in use: worker processes (server.workers) get the
    pair from the main process, as they may not read a key file only root can.
    """

    def __init__(self, cert_path: Path, key_path: Path, pem: tuple[bytes, bytes] | None = None) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.pem = pem if pem is not None else read_tls_pair(cert_path, key_path)
        self.options = tls_options_from_pem(*self.pem, cert_path, key_path)

    def reload(self, pem: tuple[bytes, bytes] | None = None) -> None:
        """Read the pair again (or take `pem`); on TLSSetupError the previous pair stays in use."""
        pem = pem if pem is not None else read_tls_pair(self.cert_path, self.key_path)
        self.options = tls_options_from_pem(*pem, self.cert_path, self.key_path)
        self.pem = pem

    def getContext(self) -> SSL.Context:
        return self.options.getContext()


def _pem_blocks(pem: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [block.strip() + b"\n" + end + b"\n" for block in pem.split(end) if b"-----BEGIN CERTIFICATE-----" in block]
