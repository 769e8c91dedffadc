"""DKIM signatures verify with dkimpy against the record served by the test DNS."""

from __future__ import annotations

import dkim
import dns.resolver
import pytest

from mailhost.authn.dkim import ED25519, RSA, DkimKeyError, Signer, generate, sign
from mailhost.message import from_domain
from tests.support.dns import DNSServer

MESSAGE = (
    b"From: Campaign <news@example.test>\nTo: reader@remote.test\nSubject: Spring sale\n"
    b"Date: Sun, 29 Nov 2026 10:00:00 +0000\nMessage-ID: <1@example.test>\nMIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=utf-8\n"
    b"List-Unsubscribe: <https://example.test/u/1>, <mailto:unsub@example.test>\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\n\nHello,\n.leading dot\nbye\n"
)


def verifier(server: DNSServer):
    resolver = dns.resolver.Resolver(configure=False)
    host, _, port = server.nameserver.rpartition(":")
    resolver.nameservers = [host]
    resolver.port = int(port)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    return dnsfunc


@pytest.mark.parametrize("algorithm", [RSA, ED25519])
def test_signed_mail_verifies_and_altered_body_fails(tmp_path, algorithm):
    path, record = generate(tmp_path, "example.test", "s2026", algorithm)
    assert path.stat().st_mode & 0o077 == 0
    signer = Signer(tmp_path)
    key = signer.key_for(from_domain(MESSAGE))
    assert key is not None and key.algorithm == algorithm
    header = sign(MESSAGE, key)
    signed = header + MESSAGE
    with DNSServer([("s2026._domainkey.example.test", "TXT", record)]) as server:
        assert dkim.verify(signed, dnsfunc=verifier(server))
        assert not dkim.verify(signed.replace(b"Hello,", b"Hellooo,"), dnsfunc=verifier(server))
    tags = dict(t.strip().split("=", 1) for t in header.decode().split(":", 1)[1].replace("\n", "").replace("\t", "").split(";") if "=" in t)
    signed_headers = [h.strip() for h in tags["h"].split(":")]
    assert "list-unsubscribe" in signed_headers and "list-unsubscribe-post" in signed_headers
    assert signed_headers.count("from") == 2 and signed_headers.count("reply-to") == 1  # over-signed, absent ones too
    assert tags["c"] == "relaxed/relaxed" and tags["d"] == "example.test" and tags["s"] == "s2026"


def test_keygen_refuses_to_overwrite_and_unknown_domains_are_not_signed(tmp_path):
    generate(tmp_path, "example.test", "s1")
    with pytest.raises(DkimKeyError):
        generate(tmp_path, "example.test", "s1")
    assert Signer(tmp_path).key_for("other.test") is None
    assert Signer(tmp_path).key_for(None) is None


def test_dkim_config_entry_names_the_key(tmp_path):
    from mailhost.config import ConfigError, load
    from mailhost.authn.dkim import configured_keys

    key_path, _ = generate(tmp_path / "elsewhere", "example.test", "s9", ED25519)
    base = '[[listener]]\nrole = "mx"\nendpoint = "tcp:2525"\n[[domain]]\nname = "example.test"\n'
    (tmp_path / "mailhost.toml").write_text(
        base + f'[[dkim]]\ndomain = "example.test"\nselector = "s9"\nkey_file = "{key_path}"\nalgorithm = "ed25519-sha256"\n')
    config = load(tmp_path / "mailhost.toml")
    keys = configured_keys(config.dkim)
    assert keys["example.test"].selector == "s9" and keys["example.test"].algorithm == ED25519
    assert Signer(tmp_path, keys).key_for("example.test").selector == "s9"
    (tmp_path / "mailhost.toml").write_text(base + '[[dkim]]\ndomain = "example.test"\nselector = "s9"\nkey_file = "nope.key"\n')
    with pytest.raises(ConfigError, match="dkim\\[0\\].key_file"):
        load(tmp_path / "mailhost.toml")


def test_a_new_key_is_used_within_a_second_without_a_stat_per_message(tmp_path, monkeypatch):
    import mailhost.authn.dkim as dkim_sign

    now = [1000.0]
    monkeypatch.setattr(dkim_sign.time, "monotonic", lambda: now[0])
    signer = Signer(tmp_path)
    assert signer.key_for("example.test") is None
    generate(tmp_path, "example.test", "s1")
    assert signer.key_for("example.test") is None  # checked a moment ago
    now[0] += dkim_sign.KEYS_CHECK_SECONDS
    assert signer.key_for("example.test").selector == "s1"


def test_a_header_section_dkimpy_cannot_read_goes_unsigned(tmp_path):
    generate(tmp_path, "example.test", "s1")
    message = b"Received : from laptop\nFrom: news@example.test\n\nbody\n"  # RFC 5322 4.5 obsolete syntax
    key = Signer(tmp_path).key_for(from_domain(message))
    assert key is not None  # it is mail from example.test ...
    assert sign(message, key) == b""  # ... but dkimpy cannot read it: unsigned, not an error


PREPENDED = [
    b"From: Attacker <ceo@example.test>\n", b"To: victim@remote.test\n", b"Cc: more@remote.test\n",
    b"Subject: Urgent: wire money\n", b"Date: Mon, 30 Nov 2026 10:00:00 +0000\n", b"Message-ID: <2@evil.test>\n",
    b"Reply-To: attacker@evil.test\n", b"MIME-Version: 1.0\n", b"Content-Type: text/html\n",
    b"Content-Transfer-Encoding: base64\n", b"Content-Disposition: attachment\n",
    b"List-Unsubscribe: <https://evil.test/u>\n", b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\n",
    b"List-Id: <evil.test>\n", b"Sender: attacker@evil.test\n", b"Feedback-ID: 1:evil\n",
]


@pytest.mark.parametrize("field", PREPENDED, ids=[f.split(b":")[0].decode() for f in PREPENDED])
def test_a_copy_with_one_more_signed_field_does_not_verify(tmp_path, field):
    """Every signed field that must appear once is over-signed (RFC 6376 8.15): prepending one,
    whether the message had it (Subject) or not (Reply-To), breaks the signature."""
    path, record = generate(tmp_path, "example.test", "s1")
    signed = sign(MESSAGE, Signer(tmp_path).key_for("example.test")) + MESSAGE
    with DNSServer([("s1._domainkey.example.test", "TXT", record)]) as server:
        assert dkim.verify(signed, dnsfunc=verifier(server))
        signature_end = signed.index(b"\nFrom: ") + 1
        tampered = signed[:signature_end] + field + signed[signature_end:]
        assert not dkim.verify(tampered, dnsfunc=verifier(server))
