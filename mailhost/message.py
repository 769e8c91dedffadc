"""Header-block and address helpers, one copy for every module that reads a message.

A stored message has LF line endings (the codec normalised it). Its header block
is everything up to and including the LF before the first empty line; a message
that starts with an empty line has no header block.
"""

from __future__ import annotations

import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

HOP_LIMIT = 50  # Received: headers; more means a mail loop (RFC 5321 6.3)

# Anything that looks like an address, for From: values the parser cannot read.
_ADDRESS_LIKE = re.compile(r"[^\s<>,;:\"()\[\]]+@[^\s<>,;:\"()]+")
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE)
_FIELD_START = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")


def split_address(address: str) -> tuple[str, str]:
    """(local part, domain) of `address`; the domain is "" when there is no @."""
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


def domain_of(address: str) -> str:
    """The domain of `address`, lower case ("" when it has none)."""
    return split_address(address)[1].lower()


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header block, the rest: the empty line and the body)."""
    if message.startswith(b"\n"):
        return b"", message
    end = message.find(b"\n\n")
    if end < 0:
        return message, b""
    return message[: end + 1], message[end + 1:]


def header_block(message: bytes) -> bytes:
    return split_message(message)[0]


def read_headers(message: bytes) -> Message:
    """The header section of a stored message, parsed leniently (never raises for bad input)."""
    return BytesHeaderParser(policy=compat32).parsebytes(header_block(message))


def field_names(message: bytes) -> set[str]:
    """The lower-case names of the header fields present."""
    return {
        line.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
        for line in header_block(message).split(b"\n")
        if line and line[:1] not in (b" ", b"\t") and b":" in line
    }


def has_fields(message: bytes, names: tuple[bytes, ...]) -> bool:
    """Whether every field in `names` (lower case, e.g. b"date") starts a line of the header
    block: a fast check for the hot path; "no" may be wrong for odd spellings (white space
    before the colon), so callers then parse the block properly."""
    block = header_block(message).lower()
    return all(block.startswith(name + b":") or b"\n" + name + b":" in block for name in names)


def from_addresses(headers: Message) -> list[str]:
    """Every address in every From: header.

    A value the parser cannot read whole counts as claiming every address-like
    word in it, so a mangled header cannot slip a local address past a check.
    """
    found: list[str] = []
    for value in headers.get_all("From", []):
        value = str(value)
        parsed = [address for _, address in getaddresses([value])]
        if parsed and all("@" in address for address in parsed):
            found.extend(parsed)
        else:
            found.extend(_ADDRESS_LIKE.findall(value))
    return found


def from_domain(message: bytes) -> str | None:
    """The domain of the (first) From: address, lower case; None when there is none."""
    addresses = getaddresses([str(v) for v in read_headers(message).get_all("From", [])])
    for _, address in addresses:
        if "@" in address:
            return domain_of(address)
    return None


def original_headers(message: bytes) -> bytes:
    """The header block of `message`: its lines up to (not including) the
    empty line that ends it, line endings as they are.

    The block also ends, as in `email`'s parser, at the first line that is
    neither a field nor a continuation (a message without the empty line);
    a message that is all headers is returned whole.
    """
    pos = 0
    end = len(message)
    while pos < end:
        nl = message.find(b"\n", pos)
        stop = end if nl < 0 else nl + 1
        line = message[pos:stop]
        bare = line.rstrip(b"\r\n")
        if not bare:
            break  # the empty line
        if bare[:1] in (b" ", b"\t"):
            if pos == 0:
                break  # a continuation with nothing to continue
        elif not _FIELD_START.match(bare):
            break
        pos = stop
    return message[:pos]


def received_count(message: bytes) -> int:
    """How many Received: fields the header block of `message` has (for the
    RFC 5321 6.3 loop rule), the field name compared without case."""
    return sum(1 for line in original_headers(message).split(b"\n") if _RECEIVED.match(line))


def too_many_hops(message: bytes) -> bool:
    """More Received: fields than HOP_LIMIT (RFC 5321 6.3: a mail loop). The word's count up
    to the first empty line is an upper bound that settles the usual case without parsing the
    header block."""
    ends = [at for at in (message.find(b"\n\n"), message.find(b"\n\r\n")) if at >= 0]
    head = message[: min(ends) + 1] if ends else message
    if head.lower().count(b"received") <= HOP_LIMIT:
        return False
    return received_count(message) > HOP_LIMIT


def drop_field(block: bytes, name: bytes) -> bytes:
    """`block` without any `name:` field (with its continuation lines); `name` lower case."""
    out, skipping = [], False
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() == name
        if not skipping:
            out.append(line)
    return b"".join(out)
