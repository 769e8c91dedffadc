"""The MX certificate checks: WebPKI for MTA-STS (RFC 8461 4.2), TLSA matching for DANE (RFC 7672 3)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from OpenSSL import crypto

from mailhost.delivery.tls_checks import Tlsa, WebPki, verify_dane
from tests.support.pki import TestCA


def chain_of(path) -> list[crypto.X509]:
    pem = path.read_bytes()
    end = b"-----END CERTIFICATE-----"
    return [crypto.load_certificate(crypto.FILETYPE_PEM, block + end) for block in pem.split(end) if b"BEGIN" in block]


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("ca"))


def test_webpki(ca, tmp_path):
    check = WebPki(ca.path)
    good = chain_of(ca.issue("good", "mx1.example.net", with_ca=True)[0])
    assert check.verify(good, "mx1.example.net") is None
    assert check.verify(good, "MX1.example.net") is None
    assert check.verify(good, "mx2.example.net").result_type == "certificate-host-mismatch"
    expired = chain_of(ca.issue("old", "mx1.example.net", expired=True)[0])
    assert check.verify(expired, "mx1.example.net").result_type == "certificate-expired"
    stranger = TestCA(tmp_path / "other", "another CA")
    untrusted = chain_of(stranger.issue("x", "mx1.example.net")[0])
    assert check.verify(untrusted, "mx1.example.net").result_type == "validation-failure"
    assert check.verify([], "mx1.example.net").result_type == "validation-failure"
    wildcard = chain_of(ca.issue("wild", "*.example.net")[0])
    assert check.verify(wildcard, "mx7.example.net") is None


def spki(cert: crypto.X509) -> bytes:
    return cert.to_cryptography().public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def der(cert: crypto.X509) -> bytes:
    return cert.to_cryptography().public_bytes(Encoding.DER)


def test_dane_ee_matches_key_or_certificate_and_ignores_names_and_dates(ca):
    [leaf] = chain_of(ca.issue("ee", "anything.example", expired=True)[0])
    for record in (Tlsa(3, 1, 1, hashlib.sha256(spki(leaf)).digest()),
                   Tlsa(3, 0, 2, hashlib.sha512(der(leaf)).digest()),
                   Tlsa(3, 1, 0, spki(leaf))):
        assert verify_dane([leaf], [record], ["mx.example.net"]) is None
    wrong = Tlsa(3, 1, 1, hashlib.sha256(b"another key").digest())
    assert verify_dane([leaf], [wrong], ["mx.example.net"]).result_type == "validation-failure"


def test_dane_ta_needs_a_presented_anchor_and_a_name(ca):
    chain = chain_of(ca.issue("ta", "mx.example.net", with_ca=True)[0])
    anchor = Tlsa(2, 0, 1, hashlib.sha256(der(chain[1])).digest())
    assert verify_dane(chain, [anchor], ["mx.example.net", "example.net"]) is None
    assert verify_dane(chain, [anchor], ["other.example"]).result_type == "certificate-host-mismatch"
    # The anchor must be in what the server presents (RFC 7672 3.1.2).
    assert verify_dane(chain[:1], [anchor], ["mx.example.net"]).result_type == "validation-failure"


@pytest.mark.parametrize("usage, selector, mtype, usable", [
    (3, 1, 1, True), (2, 0, 1, True), (3, 1, 2, True), (3, 0, 0, True),
    (1, 1, 1, False), (0, 0, 1, False), (3, 2, 1, False), (3, 1, 3, False),
])
def test_usable_records(usage, selector, mtype, usable):
    assert Tlsa(usage, selector, mtype, b"").usable is usable
