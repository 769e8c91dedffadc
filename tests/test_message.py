"""mailhost.message: the header-block and address helpers every module shares."""

from __future__ import annotations

import pytest

from mailhost.message import (
    HOP_LIMIT,
    domain_of,
    drop_field,
    field_names,
    from_domain,
    has_fields,
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
