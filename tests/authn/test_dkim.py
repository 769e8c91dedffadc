"""DKIM signatures: they verify with dkimpy (records from the test DNS), OpenDKIM and Mail::DKIM,
and the header is byte for byte the one dkimpy makes."""

from __future__ import annotations

import random
from collections import Counter
from unittest import mock

import dkim
import dns.resolver
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mailhost.authn.dkim import (ED25519, OVERSIGNED, RSA, SIGNED_HEADERS, DkimKey, DkimKeyError, Signer, generate,
                                  load_key, sign)
from mailhost.message import from_domain
from mailhost.smtp.wire import stuff_from_lf
from tests.support.dkim_verifiers import mail_dkim, opendkim
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


# --- the signer against dkimpy, byte for byte ----------------------------------------------------


@pytest.fixture(scope="session")
def made_keys(tmp_path_factory) -> dict[str, tuple[bytes, str]]:
    """Per algorithm: (the private key as the key file holds it, the TXT record), made once."""
    keys = {}
    for algorithm in (RSA, ED25519):
        path, record = generate(tmp_path_factory.mktemp("dkim"), "example.test", "s1", algorithm)
        keys[algorithm] = load_key(path, "example.test", "s1").private, record
    return keys


def as_received(message: bytes) -> bytes:
    """The message as a receiver has it: what smtp.wire sends, without the dot-stuffing."""
    wire = stuff_from_lf(message)[:-3]
    return (b"\r\n" + wire).replace(b"\r\n..", b"\r\n.")[2:]


def dkimpy_header(message: bytes, key: DkimKey, now: int) -> bytes:
    """dkimpy's DKIM-Signature for the received form, with the h= list built from dkimpy's own
    reading of the header section (b"" when dkimpy cannot read it)."""
    received = as_received(message)
    try:
        counts = Counter(name.lower() for name, _ in dkim.DKIM(received).headers)
    except (dkim.MessageFormatError, IndexError):  # IndexError: a continuation line comes first
        return b""
    names = []
    for name in SIGNED_HEADERS:
        names += [name.encode()] * (counts[name.encode()] + (name in OVERSIGNED))
    with mock.patch("time.time", return_value=now + 0.5):
        header = dkim.sign(received, key.selector.encode(), key.domain.encode(), key.private,
                           canonicalize=(b"relaxed", b"relaxed"), include_headers=names,
                           signature_algorithm=key.algorithm.encode(), linesep=b"\n")
    return header if header.endswith(b"\n") else header + b"\n"


WSP = st.sampled_from([b" ", b"\t", b"  ", b" \t ", b""])
TEXT = st.lists(st.sampled_from([b"a", b"Zz", b" ", b"\t", b"  \t", b"\xc3\xa9", b";", b"=", b":", b"<x@y.test>",
                                 b".", b"\r", b"From "]), max_size=12).map(b"".join)
NAMES = st.sampled_from(["From", "from", "TO", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "Received",
                         "X-Mailer", "List-Unsubscribe", "list-unsubscribe-post", "Content-Type", "References",
                         "In-Reply-To", "MIME-Version", "Feedback-ID", "DKIM-Signature", "X-" + "Long" * 20])


@st.composite
def fields(draw) -> bytes:
    name = draw(NAMES).encode()
    value = draw(WSP) + draw(TEXT) + draw(WSP)
    folds = draw(st.lists(st.tuples(st.sampled_from([b" ", b"\t", b"  "]), TEXT), max_size=3))
    return name + draw(st.sampled_from([b":", b": ", b":\t"])) + value + b"".join(
        b"\n" + lead + text for lead, text in folds) + b"\n"


@st.composite
def messages(draw) -> bytes:
    head = b"From: News <news@example.test>\n" + b"".join(draw(st.lists(fields(), max_size=10)))
    if draw(st.booleans()):
        head = draw(st.sampled_from([b"From sender@example.test Fri Dec  4 10:00:00 2026\n", b" folded first\n",
                                     b"Received : obsolete\n", b"Caf\xc3\xa9: 8-bit name\n"])) + head
    lines = draw(st.lists(TEXT, max_size=12))
    body = b"".join(line + draw(st.sampled_from([b"\n", b"\r\n", b" \n", b"\t\r\n"])) for line in lines)
    body += draw(st.sampled_from([b"", b"\n", b"\n\n", b" \n\t\n", b"\r\n\r\n", b"no final newline", b"trailing WSP \t"]))
    message = head + b"\n" + body
    return message.replace(b"\n", b"\r\n") if draw(st.booleans()) else message


KEY_NAMES = st.sampled_from([("example.test", "s1"), ("mail." + "d" * 60 + ".example.test", "s" * 63),
                             ("x.test", "selector-2026-11")])


# The suite's fuzz budget (tests/conftest.py: 100 examples): 300 cost ~20 s on CI, nearly all of it
# Hypothesis building the messages, not signing them.
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages(), algorithm=st.sampled_from([RSA, ED25519]), names=KEY_NAMES,
       now=st.integers(1_000_000_000, 1_700_000_000))  # t= in the past: dkimpy refuses a future one
def test_the_signature_header_is_dkimpys_byte_for_byte(made_keys, message, algorithm, names, now):
    """Same key, h= list and t=: the header equals dkimpy's for the form receivers get
    (RSASSA-PKCS1-v1_5 and Ed25519 are deterministic), and dkimpy verifies it there."""
    private, record = made_keys[algorithm]
    key = DkimKey(names[0], names[1], algorithm, private)
    ours, theirs = sign(message, key, now), dkimpy_header(message, key, now)
    assert bool(ours) == bool(theirs)
    if ours:
        received = as_received(message)
        assert dkim.verify(ours + received, dnsfunc=lambda name, timeout=5: record.encode())
        if dkim.verify(theirs + received, dnsfunc=lambda name, timeout=5: record.encode()):
            assert ours == theirs
        else:  # dkimpy folds inside d= and i= of a domain over 68 characters; we do not
            assert len(key.domain) > 68 and ours.replace(b"\n ", b" ") != theirs.replace(b"\n ", b" ")


@pytest.mark.parametrize("message", [
    MESSAGE, b"From: a@example.test", b"From: a@example.test\n", b"From: a@example.test\n\n",
    b"From: a@example.test\n\n\n\n", b"From: a@example.test\n\n \t \n\t\n", b"From: a@example.test\n\nline\r",
    b"From: a@example.test\n\nno final newline  \t", b"From: a@example.test\nSubject: a\rb\n\nbare CR in a field\n",
    b"From: a@example.test\nSubject: one\nSubject: two\nTo: x@y.test\n  folded\tonce\n\t\tand twice\n\nbody\n",
], ids=lambda m: repr(m[:24]))
def test_corner_cases_match_dkimpy(made_keys, message):
    private, _ = made_keys[RSA]
    key = DkimKey("example.test", "s1", RSA, private)
    assert sign(message, key, 1_800_000_000) == dkimpy_header(message, key, 1_800_000_000)


# --- the signatures against OpenDKIM and Mail::DKIM ---------------------------------------------


def newsletter(size: int) -> bytes:
    """A campaign-shaped message of about `size` bytes: text and indented HTML parts."""
    head = (b"From: Example News <news@example.test>\nTo: reader@remote.test\nSubject: November news\n"
            b"Date: Sun, 29 Nov 2026 10:00:00 +0000\nMessage-ID: <n1@example.test>\nMIME-Version: 1.0\n"
            b"List-Unsubscribe: <https://example.test/u?c=2026-11>,\n <mailto:unsub@example.test>\n"
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\n"
            b'Content-Type: multipart/alternative; boundary="=_p"\n\n--=_p\nContent-Type: text/plain\n\n')
    text = b"The quick brown fox jumps over a lazy dog \xe2\x80\x94 and ships.\n"
    html = b"  <p>\tThe   quick brown fox</p>   \n"
    half = max(0, (size - len(head)) // 2)
    return head + text * (half // len(text)) + b"--=_p\nContent-Type: text/html\n\n" + html * (half // len(html)) + b"--=_p--\n"


def odd_message(rng: random.Random) -> bytes:
    """Random fields and lines from the same pieces as the Hypothesis strategy above."""
    pieces = [b"a", b"Zz", b" ", b"\t", b"  \t", b"\xc3\xa9", b";", b"=", b":", b"<x@y.test>", b".", b"\r", b"From "]
    text = lambda: b"".join(rng.choice(pieces) for _ in range(rng.randrange(12)))  # noqa: E731
    # (a bare CR in a field would end its line on the wire, and the message go unsigned)
    field_text = lambda: text().replace(b"\r", b"")  # noqa: E731
    names = [b"To", b"Cc", b"Subject", b"subject", b"Reply-To", b"X-Mailer", b"References", b"Content-Type"]
    head = b"From: News <news@example.test>\n" + b"".join(
        rng.choice(names) + b":" + rng.choice([b"", b" ", b"\t "]) + field_text()
        + b"".join(b"\n" + rng.choice([b" ", b"\t"]) + field_text() for _ in range(rng.randrange(3))) + b"\n"
        for _ in range(rng.randrange(8)))
    body = b"".join(text() + rng.choice([b"\n", b"\r\n", b" \n", b"\t\r\n"]) for _ in range(rng.randrange(12)))
    return head + b"\n" + body + rng.choice([b"", b"\n\n", b" \n\t\n", b"no final newline", b"trailing WSP \t"])


CORPUS = [
    MESSAGE, newsletter(4 * 1024), newsletter(100 * 1024),
    b"From: a@example.test\n\n", b"From: a@example.test\n", b"From: a@example.test\n\n\n\n",
    b"From: a@example.test\n\n \t \n\t\n", b"From: a@example.test\n\nno final newline  \t",
    b"From: a@example.test\n\nbare\rCR\n", b"From: a@example.test\r\nSubject: CRLF\r\n\r\nstored with CRLF\r\n",
    b"From: a@example.test\nSubject: one\nSubject: two\nTo: x@y.test\n  folded\tonce\n\t\tand twice\n\nbody\n",
    b"From: a@example.test\nSubject: =?utf-8?q?caf=C3=A9?=\n\n8-bit \xc3\xa9\xe2\x82\xac\xff body\n.leading dot\n",
    b"From: a@example.test\nSubject: " + b"long " * 300 + b"\n\n" + b"x" * 990 + b"\n",
] + [odd_message(random.Random(seed)) for seed in range(40)]


@pytest.mark.parametrize("algorithm", [RSA, ED25519])
def test_opendkim_and_mail_dkim_verify_every_signature(made_keys, tmp_path, algorithm):
    """The corpus, signed and sent as smtp.wire sends it, verifies with OpenDKIM (both
    algorithms) and Mail::DKIM (rsa-sha256; Debian's knows no ed25519); one altered body
    fails with both, so a pass means they checked."""
    private, record = made_keys[algorithm]
    key = DkimKey("example.test", "s1", algorithm, private)
    files = []
    for index, message in enumerate(CORPUS + [b"From: a@example.test\n\naltered\n"]):
        header = sign(message, key, 1_700_000_000)
        assert header, message[:80]
        received = as_received(header + message)
        if index == len(CORPUS):
            received = received.replace(b"altered", b"alter3d")
        files.append(tmp_path / f"{index:02}.eml")
        files[-1].write_bytes(received)
    records = {"s1._domainkey.example.test": record}
    verifiers = {"opendkim": opendkim(files, records)}
    if algorithm == RSA:
        verifiers["Mail::DKIM"] = mail_dkim(files, records)
    for name, results in verifiers.items():
        failed = {path.name: result for path, result in results.items() if result != "pass"}
        assert list(failed) == [files[-1].name], f"{name}: {failed}"
