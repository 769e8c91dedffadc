"""The users file (mailhost.local.users): the line format, old and new, and what is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailhost.local.users import UserEntry, UsersFile, UsersFileError, parse_send_as, read_users, write_users

HASH = "$scrypt$ln=15,r=8,p=1$c2FsdA$ZGlnZXN0"


def test_lines_without_options_read_as_before(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"# comment\n\nAlice@Example.test:{HASH}\n")
    assert read_users(path) == {"alice@example.test": UserEntry("alice@example.test", HASH)}


def test_may_send_as_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "users"
    entries = {
        "alice@example.test": UserEntry("alice@example.test", HASH),
        "news@example.test": UserEntry("news@example.test", HASH, ("info@example.test", "@campaign.test")),
    }
    write_users(path, entries)
    lines = path.read_text().splitlines()
    # A user without options is written exactly as before the option existed.
    assert lines == [f"alice@example.test:{HASH}", f"news@example.test:{HASH}:may_send_as=info@example.test,@campaign.test"]
    assert read_users(path) == entries


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a@example.test", ("a@example.test",)),
        ("A@Example.TEST, @Other.test", ("a@example.test", "@other.test")),
        ("a@x.test,a@x.test", ("a@x.test",)),
    ],
)
def test_parse_send_as(text: str, expected: tuple[str, ...]) -> None:
    assert parse_send_as(text) == expected


@pytest.mark.parametrize("text", ["", "alice", "a@b@c.test", "@", "a@localhost", "a b@x.test", "a@x.test,", "<a@x.test>"])
def test_parse_send_as_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_send_as(text)


@pytest.mark.parametrize(
    "line, words",
    [
        (f"alice@example.test:{HASH}:bogus=1", ["users:1", "bogus"]),
        (f"alice@example.test:{HASH}:may_send_as", ["users:1", "may_send_as"]),
        (f"alice@example.test:{HASH}:may_send_as=nobody", ["users:1", "nobody"]),
        ("no separator here", ["users:1", "address:hash"]),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, line: str, words: list[str]) -> None:
    path = tmp_path / "users"
    path.write_text(line + "\n")
    with pytest.raises(UsersFileError) as caught:
        read_users(path)
    for word in words:
        assert word in str(caught.value)


def test_forget_rereads_an_unchanged_looking_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    write_users(path, {"a@x.test": UserEntry("a@x.test", HASH)})
    users = UsersFile(path)
    assert list(users.entries()) == ["a@x.test"]
    # Same size and a restored mtime: the stat stamp cannot see this change.
    stat = path.stat()
    path.write_text(f"b@x.test:{HASH}\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert list(users.entries()) == ["a@x.test"]
    users.forget()
    assert list(users.entries()) == ["b@x.test"]
