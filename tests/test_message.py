"""mailhost.message: the header-block and address helpers every module shares."""

from __future__ import annotations

import random

import pytest

from mailhost.message import (
    HOP_LIMIT,
    domain_of,
    drop_field,
    field_names,
    from_domain,
    has_fields,
    header_block,
    normalize_address,
    parse_address_list,
    parse_header_section,
    read_headers,
    split_address,
    split_message,
    too_many_hops,
)


@pytest.mark.parametrize("address, parts, domain", [
    ("alice@example.test", ("alice", "example.test"), "example.test"),
    ("Alice@Example.TEST", ("Alice", "Example.TEST"), "example.test"),
    ('"a@b"@example.test', ('"a@b"', "example.test"), "example.test"),  # the last @ separates
    ("postmaster", ("postmaster", ""), ""),
    ("", ("", ""), ""),
])
def test_addresses_split_at_the_last_at(address: str, parts: tuple[str, str], domain: str) -> None:
    assert split_address(address) == parts
    assert domain_of(address) == domain


@pytest.mark.parametrize("message, block", [
    (b"From: a@b.test\nSubject: x\n\nbody\n", b"From: a@b.test\nSubject: x\n"),
    (b"\nFrom: not a header\n", b""),  # starts with the empty line: no header block
    (b"Subject: only headers", b"Subject: only headers"),
])
def test_the_header_block_ends_at_the_first_empty_line(message: bytes, block: bytes) -> None:
    assert split_message(message)[0] == block
    assert b"".join(split_message(message)) == message


@pytest.mark.parametrize("message, names, present", [
    (b"Date: x\nMessage-ID: <1@x>\n\nbody", (b"message-id", b"date"), True),
    (b"message-id: <1@x>\nDATE: x\n\n", (b"message-id", b"date"), True),
    (b"Date: x\n\nMessage-ID: <1@x>\n", (b"message-id", b"date"), False),  # in the body: not a field
    (b"X-Date: x\nMessage-ID: <1@x>\n\n", (b"message-id", b"date"), False),
    (b"Subject: about Date: and more\n\n", (b"date",), False),
])
def test_has_fields_sees_only_fields_of_the_header_block(message: bytes, names: tuple[bytes, ...], present: bool) -> None:
    assert has_fields(message, names) is present
    assert present == all(n.decode() in field_names(message) for n in names)


def test_from_domain_and_drop_field() -> None:
    assert from_domain(b"From: Alice <alice@Example.TEST>\nTo: b@c.test\n\n") == "example.test"
    assert from_domain(b"To: b@c.test\n\n") is None
    block = b"To: a@b.test\nBcc: secret@x.test,\n other@y.test\nSubject: s\n"
    assert drop_field(block, b"bcc") == b"To: a@b.test\nSubject: s\n"


@pytest.mark.parametrize("count, loop", [(HOP_LIMIT, False), (HOP_LIMIT + 1, True)])
def test_the_hop_limit_counts_received_fields(count: int, loop: bool) -> None:
    message = b"Received: from x by y; date\n" * count + b"Subject: s\n\nreceived received received\n"
    assert too_many_hops(message) is loop
    # The word in the body alone never makes a loop.
    assert not too_many_hops(b"Subject: s\n\n" + b"Received: x\n" * (HOP_LIMIT + 5))


# --- the header section parser (RFC 5322 2.2, 3.6.8, 4.5) ----------------------------------

SECTIONS = [
    # (message, (name, unfolded text) of each field, readable unambiguously)
    (b"From: a@b.test\nSubject: x\n\nbody\n", [("From", "a@b.test"), ("Subject", "x")], True),
    # White space before the colon is RFC 5322 4.5's obsolete syntax: still a field.
    (b"Received : x\nFrom: bob@example.test\n\n", [("Received", "x"), ("From", "bob@example.test")], True),
    (b"From : bob@example.test\n\n", [("From", "bob@example.test")], True),
    (b"From\t: bob@example.test\n\n", [("From", "bob@example.test")], True),
    (b"Subject: a\n folded\n\tmore\nFrom: x\n\n", [("Subject", "a folded\tmore"), ("From", "x")], True),
    (b"Subject: s\n \nFrom: x\n\n", [("Subject", "s"), ("From", "x")], True),  # a line of WSP: obs-FWS
    (b"From: a\r\nSubject: b\r\n\r\nbody", [("From", "a"), ("Subject", "b")], True),
    (b"Subject: only headers", [("Subject", "only headers")], True),
    (b"From:\n\n", [("From", "")], True),
    (b"\nFrom: not a field\n", [], True),  # no header section at all
    (b"", [], True),
    (b"Subject: s\n\nFrom: in the body\nno field\n", [("Subject", "s")], True),
    # What the section cannot be read as unambiguously; the fields around it are still found.
    (b"X-Caf\xc3\xa9: x\nFrom: bob@example.test\n\n", [("From", "bob@example.test")], False),  # non-ASCII name
    (b" continues nothing\nFrom: x\n\n", [("From", "x")], False),
    (b"From: x\nno colon here\nSender: y\n\n", [("From", "x"), ("Sender", "y")], False),
    (b"Bad Name: x\nFrom: y\n\n", [("From", "y")], False),
    (b": empty name\nFrom: y\n\n", [("From", "y")], False),
    (b"From alice@x.test Mon Jan  1 00:00:00 2024\nFrom: y\n\n", [("From", "y")], False),  # an mbox From_ line
    (b"From: x\nSubject: y\nHello, this is the body without the empty line.\n", [("From", "x"), ("Subject", "y")],
     False),
]


@pytest.mark.parametrize("message, fields, readable", SECTIONS, ids=[repr(r[0][:30]) for r in SECTIONS])
def test_the_header_section_is_read_as_rfc_5322_says(message: bytes, fields: list[tuple[str, str]],
                                                     readable: bool) -> None:
    section = parse_header_section(message)
    assert [(f.name, f.text) for f in section.fields] == fields
    assert (not section.malformed) is readable, section.malformed
    rest = message[section.end:]  # the empty line and the body, or nothing
    assert rest == b"" or rest.startswith((b"\n", b"\r\n"))
    if b"\r" not in message:
        assert section.end == len(header_block(message))


def test_header_section_lookup_ignores_case_and_obsolete_white_space() -> None:
    section = read_headers(b"message-id : <m@x.test>\nFROM: a@x.test\nfrom:b@y.test\n\nbody")
    assert section.get("Message-ID") == "<m@x.test>"
    assert [f.text for f in section.all("From")] == ["a@x.test", "b@y.test"]
    assert section.get("Date") is None
    assert field_names(b"Received : x\nDKIM-Signature: y\n\n") == {"received", "dkim-signature"}


ADDRESS_LISTS = [
    # (field body, the addresses it names (normalised), or None: it is no address list)
    ("alice@example.test", ["alice@example.test"]),
    ("Alice <alice@example.test>", ["alice@example.test"]),
    ('a@x.test, "B, b" <b@y.test>', ["a@x.test", "b@y.test"]),
    ("bob@example.test.", ["bob@example.test"]),  # the root's dot: the same domain
    ("Bob <BOB@Example.TEST.>", ["BOB@example.test"]),
    ('"alice"@example.test', ["alice@example.test"]),
    ('"a\\"b"@x.test', ['a"b@x.test']),
    ("bob . smith @ example . test", ["bob.smith@example.test"]),  # obs-local-part, obs-domain
    ("<@route.test,@other.test:bob@example.test>", ["bob@example.test"]),  # obs-route
    ("team: a@x.test, b@y.test;", ["a@x.test", "b@y.test"]),
    ("undisclosed-recipients:;", []),
    ("", []),
    ("a@x.test,,b@y.test,", ["a@x.test", "b@y.test"]),  # obs-addr-list: empty elements
    ("Alice (a (nested) comment) <alice@example.test> (trailing)", ["alice@example.test"]),
    ("J. Smith <j@x.test>", ["j@x.test"]),  # obs-phrase
    ("bob@[127.0.0.1]", ["bob@[127.0.0.1]"]),
    ("Jürgen <jürgen@bücher.test>", ["jürgen@bücher.test"]),  # RFC 6532
    ("bob@example.test <", None),
    ("alice@example.test <bob@example.test>", None),
    ("alice@example.test bob@example.test", None),
    ("Alice", None),
    ("=?utf-8?q?bob=40example.test?=", None),  # an encoded word a reader shows as an address
    ("<>", None),
    ("bob@", None),
    ("@example.test", None),
    ("a@b@c.test", None),
    ('"unterminated@x.test', None),
    ("Alice <alice@example.test", None),
    ("(unclosed comment alice@x.test", None),
    ("bob@example..test", None),
    ("bob@.example.test", None),
    ("bob@example.test..", None),
    ("g: a@x.test", None),  # a group without its ;
    ("g: h: a@x.test;;", None),  # groups do not nest
    ("a\\b@x.test", None),
    ("bob@example.test>", None),
]


@pytest.mark.parametrize("text, addresses", ADDRESS_LISTS, ids=[r[0] or "empty" for r in ADDRESS_LISTS])
def test_address_lists(text: str, addresses: list[str] | None) -> None:
    assert parse_address_list(text) == addresses


@pytest.mark.parametrize("address, normal", [
    ("Bob@Example.TEST.", "Bob@example.test"),
    ("bob@example.test", "bob@example.test"),
    ('"a@b"@X.test', '"a@b"@x.test'),
    ("postmaster", "postmaster"),
])
def test_normalize_address(address: str, normal: str) -> None:
    assert normalize_address(address) == normal


def test_from_domain_reads_obsolete_syntax_and_the_final_dot() -> None:
    assert from_domain(b"Received : x\nFrom : Alice <alice@Example.TEST.>\n\n") == "example.test"


def test_the_parsers_never_raise() -> None:
    # Cheap and seeded: pieces that matter to the grammars, shuffled into many inputs.
    pieces = [b"From", b"Sender", b":", b" ", b"\t", b"\n", b"\r\n", b"\r", b"@", b"<", b">", b",", b";", b'"',
              b"\\", b"(", b")", b"[", b"]", b".", b"a", b"example.test", b"\xc3\xa9", b"\xff", b"\x00", b"=?"]
    chooser = random.Random(13)
    for _ in range(3000):
        message = b"".join(chooser.choice(pieces) for _ in range(chooser.randrange(40)))
        section = parse_header_section(message)
        assert 0 <= section.end <= len(message)
        for field in section.fields:
            assert field.name.isascii() and ":" not in field.name and field.name.strip() == field.name
            addresses = parse_address_list(field.text)
            assert addresses is None or all("@" in a for a in addresses)
