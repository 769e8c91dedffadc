"""The fix-ups our own senders' mail gets (RFC 6409 8): Message-ID: and Date: when the
client left them out. Which origins get them is the intake's decision (cleanup.py)."""

from __future__ import annotations

from email.utils import formatdate, make_msgid

from mailhost.message import HeaderSection


def missing_headers(headers: HeaderSection, hostname: str) -> bytes:
    """Message-ID: and Date: lines for the ones the message lacks (LF line endings)."""
    lines = ""
    if headers.get("Message-ID") is None:
        lines += f"Message-ID: {make_msgid(domain=hostname)}\n"
    if headers.get("Date") is None:
        lines += f"Date: {formatdate(localtime=True)}\n"
    return lines.encode("ascii")
