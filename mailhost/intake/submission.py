"""What the submission roles do to a message from an authenticated user
(RFC 6409 8): read its From: addresses for the ownership check, and add
Message-ID: and Date: when the client left them out."""

from __future__ import annotations

import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import formatdate, getaddresses, make_msgid

# Anything that looks like an address, for From: values the parser cannot read.
_ADDRESS_LIKE = re.compile(r"[^\s<>,;:\"()\[\]]+@[^\s<>,;:\"()]+")


def read_headers(message: bytes) -> Message:
    """The header section of a stored (LF) message, parsed leniently."""
    end = message.find(b"\n\n")
    header_block = message if end < 0 else message[: end + 1]
    if message.startswith(b"\n"):
        header_block = b""
    return BytesHeaderParser(policy=compat32).parsebytes(header_block)


def from_addresses(headers: Message) -> list[str]:
    """Every address in every From: header.

    A value the parser cannot read whole counts as claiming every address-like
    word in it, so a mangled header cannot slip a local address past the check.
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


def missing_headers(headers: Message, hostname: str) -> bytes:
    """Message-ID: and Date: lines for the ones the message lacks (LF line endings)."""
    lines = ""
    if headers.get("Message-ID") is None:
        lines += f"Message-ID: {make_msgid(domain=hostname)}\n"
    if headers.get("Date") is None:
        lines += f"Date: {formatdate(localtime=True)}\n"
    return lines.encode("ascii")
