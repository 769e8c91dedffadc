"""Checks of an MX's certificate chain once TLS is up, before any mail (smtp.client's peer check).

- `WebPki`: what MTA-STS asks (RFC 8461 4.2): a chain to a trusted CA (the system's,
  or relay.ca_file), unexpired, for the MX host name (service-identity's rules,
  wildcards included).
- `dane_check`: what DANE asks (RFC 7672 3): the chain matches one of the MX's TLSA
  records. DANE-EE (3 x x): the leaf's certificate or public key, and nothing else:
  no name, no expiry, no CA (3.1.1). DANE-TA (2 x x): a certificate the server
  presented is the trust anchor; the leaf must chain to it and name the MX host or
  the recipient domain (3.1.2, 3.2.2, as Postfix does: "nexthop, hostname").

Every failure is a TlsFailure with its RFC 8460 result type, for TLS-RPT.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from OpenSSL import crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname

from mailhost.smtp.client import TlsFailure

_EXPIRED = 10  # X509_V_ERR_CERT_HAS_EXPIRED
_NOT_YET_VALID = 9  # X509_V_ERR_CERT_NOT_YET_VALID


def _leaf(chain: list[Any]) -> x509.Certificate | None:
    return chain[0].to_cryptography() if chain else None


def _names_match(certificate: x509.Certificate, names: list[str]) -> bool:
    for name in names:
        try:
            verify_certificate_hostname(certificate, name)
        except (VerificationError, CertificateError, ValueError):
            continue
        return True
    return False


class WebPki:
    """MTA-STS's certificate check for one MX host name, against one trust store."""

    def __init__(self, ca_file: Path | None = None) -> None:
        self._store = crypto.X509Store()
        if ca_file is not None:
            self._store.load_locations(str(ca_file))
        else:
            import ssl

            paths = ssl.get_default_verify_paths()
            self._store.load_locations(paths.cafile, paths.capath)

    def check(self, host: str) -> Any:
        """The peer check (smtp.client.PeerCheck) for MX `host`."""

        def check(chain: list[Any]) -> TlsFailure | None:
            return self.verify(chain, host)

        return check

    def verify(self, chain: list[Any], host: str) -> TlsFailure | None:
        leaf = _leaf(chain)
        if leaf is None:
            return TlsFailure("validation-failure", f"{host} presented no certificate")
        if leaf.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
            return TlsFailure("certificate-expired", f"the certificate of {host} expired {leaf.not_valid_after_utc:%Y-%m-%d}")
        if not _names_match(leaf, [host]):
            return TlsFailure("certificate-host-mismatch", f"the certificate does not name {host}")
        context = crypto.X509StoreContext(self._store, chain[0], chain[1:])
        try:
            context.verify_certificate()
        except crypto.X509StoreContextError as e:
            code = e.errors[0] if e.errors else 0
            kind = "certificate-expired" if code in (_EXPIRED, _NOT_YET_VALID) else "validation-failure"
            return TlsFailure(kind, f"the certificate of {host} is not trusted: {e}")
        return None


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698 2.1)."""

    usage: int  # 2 DANE-TA, 3 DANE-EE (0 and 1 are unusable for SMTP, RFC 7672 3.1.3)
    selector: int  # 0 the whole certificate, 1 its SubjectPublicKeyInfo
    mtype: int  # 0 exact, 1 SHA-256, 2 SHA-512
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in (2, 3) and self.selector in (0, 1) and self.mtype in (0, 1, 2)

    def matches(self, certificate: x509.Certificate) -> bool:
        if self.selector == 0:
            content = certificate.public_bytes(Encoding.DER)
        else:
            content = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if self.mtype == 1:
            content = hashlib.sha256(content).digest()
        elif self.mtype == 2:
            content = hashlib.sha512(content).digest()
        return content == self.data

    def text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


def dane_check(records: list[Tlsa], names: list[str]) -> Any:
    """The peer check (smtp.client.PeerCheck) for an MX with these usable TLSA records;
    `names` are the reference identifiers for DANE-TA (the MX host, the recipient domain)."""

    def check(chain: list[Any]) -> TlsFailure | None:
        return verify_dane(chain, records, names)

    return check


def verify_dane(chain: list[Any], records: list[Tlsa], names: list[str]) -> TlsFailure | None:
    certificates = [each.to_cryptography() for each in chain]
    if not certificates:
        return TlsFailure("validation-failure", "no certificate presented")
    leaf = certificates[0]
    if any(r.usage == 3 and r.matches(leaf) for r in records):
        return None  # DANE-EE: the key is the identity (RFC 7672 3.1.1)
    for position, certificate in enumerate(certificates):
        if not any(r.usage == 2 and r.matches(certificate) for r in records):
            continue
        # DANE-TA: this presented certificate is the trust anchor (RFC 7672 3.1.2).
        store = crypto.X509Store()
        store.add_cert(chain[position])
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)  # the anchor need not be self-signed
        try:
            crypto.X509StoreContext(store, chain[0], chain[1:]).verify_certificate()
        except crypto.X509StoreContextError as e:
            code = e.errors[0] if e.errors else 0
            kind = "certificate-expired" if code in (_EXPIRED, _NOT_YET_VALID) else "validation-failure"
            return TlsFailure(kind, f"the chain does not verify to its DANE-TA trust anchor: {e}")
        if not _names_match(leaf, names):
            return TlsFailure("certificate-host-mismatch", f"the certificate names none of {', '.join(names)} (DANE-TA)")
        return None
    return TlsFailure("validation-failure", "the certificate matches none of the TLSA records (DANE)")
