"""Fuzzing the header-block helpers (mailhost.message) with Hypothesis.

Whatever a client sends as a message (it is stored with LF line endings, but a
pickup file or a relayed message can hold anything), every helper answers: it
never raises, and the helpers agree with one another where their docstrings
say they do. Only the public functions are used, so these run unchanged
against any rewrite of the parser behind them.

The budget is the "mailhost" profile in tests/conftest.py.
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from mailhost.message import (
    HOP_LIMIT,
    drop_field,
    field_names,
    first_field_text,
    from_addresses,
    from_domain,
    has_fields,
    header_block,
    original_headers,
    read_headers,
    received_count,
    split_message,
    too_many_hops,
)

# Header-shaped pieces: field names with odd spacing and case, folding, every
# line ending, address syntax, encoded words, 8-bit and control bytes.
PIECES = [
    b"From:", b"from :", b"FROM\t:", b"Received:", b"received :", b"Sender:", b"Resent-From:",
    b"Date:", b"Message-ID:", b"message-id :", b"X-Listmonk-Campaign:", b"Subject:", b"X-\xc3\xa9:", b"\xff:", b":",
    b"\n", b"\r\n", b"\r", b"\n\n", b"\n\r\n", b" ", b"\t", b"\n ", b"\n\t",
    b"a@example.test", b"<b@example.test>", b"bob@example.test.", b"\"a b\"@x", b"@", b",", b";",
    b"(comment)", b"(", b")", b"<", b">", b"\"", b"\\", b"group:", b"=?utf-8?q?=C3=A9?=", b"=?x?b?####?=",
    b"\x00", b"\x7f", b"\x85", b"\xff", b"\xc3\xa9", b"x" * 100,
]
piece = st.one_of(st.sampled_from(PIECES), st.binary(max_size=6))
messages = st.one_of(st.binary(max_size=200), st.lists(piece, max_size=30).map(b"".join))


@st.composite
def many_received(draw: st.DrawFn) -> bytes:
    """Around HOP_LIMIT Received: fields, spelled every way, with look-alikes among
    them and maybe a line that ends the header block, so the hop rule's short cut
    and its full count both run on either side of the limit."""
    spellings = [b"Received: x\n", b"received\t: y\n", b"RECEIVED:z\n", b"ReCeIvEd  :\n"]
    # A few draws rather than one per line: a spelling pattern, not a list of 50 choices.
    count, step, offset = draw(st.integers(HOP_LIMIT - 1, HOP_LIMIT + 2)), draw(st.integers(0, 3)), draw(st.integers(0, 3))
    lines = [spellings[(i * step + offset) % len(spellings)] for i in range(count)]
    for other in draw(st.lists(st.sampled_from([b" folded received: no\n", b"X-Received: no\n", b"\n", b"\r\n",
                                                 b"not a field\n", b"\r\r\n"]), max_size=3)):
        lines.insert(draw(st.integers(0, len(lines))), other)
    return b"".join(lines) + draw(st.binary(max_size=10))


def check_helpers(message: bytes) -> None:
    head, rest = split_message(message)
    assert head + rest == message
    assert rest == b"" or rest.startswith((b"\n", b"\r\n"))  # the rest starts with the empty line
    assert header_block(message) == head

    headers = read_headers(message)
    # The short cut for one field finds what the whole parse finds.
    for name in ("Message-ID", "X-Listmonk-Campaign", "From", "Received", "Subject"):
        assert first_field_text(message, name) == headers.get(name)
    addresses = from_addresses(headers)
    assert all(isinstance(address, str) for address in addresses)
    domain = from_domain(message)
    assert domain is None or domain == domain.lower()

    names = field_names(message)
    assert all(name == name.lower() for name in names)
    # has_fields may say "no" wrongly (its docstring), never "yes".
    for name in (b"from", b"date", b"received", b"message-id"):
        if has_fields(message, (name,)):
            assert name.decode() in names
    has_fields(message, ())
    drop_field(head, b"from")

    original = original_headers(message)
    assert message.startswith(original)
    count = received_count(message)
    assert 0 <= count <= message.lower().count(b"received")
    # The short cut in too_many_hops never changes the verdict.
    assert too_many_hops(message) == (count > HOP_LIMIT)


@given(message=messages)
@example(message=b"Received : x\nFrom: a@example.test\n\nbody\n")
@example(message=b"X-\xc3\xa9: 1\nFrom : bob@example.test\n\n")
@example(message=b"From: =?utf-8?q?=C3=A9?= <\xff@example.test>\n\n")
@example(message=b"\n")
@example(message=b"")
def test_header_helpers_never_raise(message: bytes) -> None:
    check_helpers(message)


@given(message=many_received())
@example(message=b"\r\n" + b"Received: x\n" * 49)  # found: a CRLF empty line first, has_fields said yes
def test_hop_rule_near_the_limit(message: bytes) -> None:
    check_helpers(message)


@given(message=messages)
def test_header_helpers_never_raise_on_crlf_messages(message: bytes) -> None:
    """A message as relayed (CRLF line endings) rather than as stored."""
    check_helpers(message.replace(b"\n", b"\r\n"))
