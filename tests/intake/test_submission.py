"""Submission message handling (mailhost.intake.submission): From: addresses and the RFC 6409 fix-ups."""

from __future__ import annotations

import pytest

from mailhost.intake.submission import missing_headers
from mailhost.message import from_addresses, read_headers


@pytest.mark.parametrize(
    "message, addresses",
    [
        (b"From: alice@example.test\n\nbody", ["alice@example.test"]),
        (b"From: Alice <alice@example.test>\nTo: bob@example.test\n\nbody", ["alice@example.test"]),
        (b"from: a@x.test, \"B, b\" <b@y.test>\n\n", ["a@x.test", "b@y.test"]),
        (b"From: Alice\n <alice@example.test>\n\nbody", ["alice@example.test"]),  # folded
        (b"From: a@x.test\nFrom: b@y.test\n\n", ["a@x.test", "b@y.test"]),  # two headers: both count
        (b"Subject: none\n\nFrom: mallory@example.test\n", []),  # a From: line in the body is body
        (b"\nFrom: mallory@example.test\n", []),  # no header section at all
        (b"From: alice@example.test", ["alice@example.test"]),  # headers only, no body
        (b"From: undisclosed-recipients:;\n\n", []),
        (b"From: bob@example.test <\n\n", ["bob@example.test"]),  # unreadable: every address-like word counts
    ],
)
def test_from_addresses(message: bytes, addresses: list[str]) -> None:
    assert from_addresses(read_headers(message)) == addresses


def test_missing_headers_added_only_when_missing() -> None:
    added = missing_headers(read_headers(b"From: a@x.test\n\nbody"), "mail.example.test").decode()
    lines = added.splitlines()
    assert lines[0].startswith("Message-ID: <") and lines[0].endswith("@mail.example.test>")
    assert lines[1].startswith("Date: ") and len(lines) == 2
    complete = b"message-id: <m@x.test>\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\n\nbody"
    assert missing_headers(read_headers(complete), "mail.example.test") == b""
