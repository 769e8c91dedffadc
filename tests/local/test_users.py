"""The users file (mailhost.local.users): the line format, old and new, and what is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailhost.local.users import (
    UserEntry,
    UsersFile,
    UsersFileError,
    parse_local_part,
    parse_send_as,
    read_users,
    write_users,
)

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


# --- local parts: RFC 5321 syntax, and nothing the file format or a folder name cannot hold ----


@pytest.mark.parametrize(
    "text, bare",
    [
        ("alice", "alice"),
        ("Alice.Smith", "alice.smith"),
        ("o'neil", "o'neil"),
        ("a_b-c!x", "a_b-c!x"),
        ('"alice"', "alice"),  # quoted where it need not be: the same mailbox
        ('"a..b"', "a..b"),  # quoting makes it a valid local part (RFC 5321 4.1.2)
        ("jörg", "jörg"),  # RFC 6531
        ("a" * 64, "a" * 64),
    ],
)
def test_local_parts_accepted(text: str, bare: str) -> None:
    assert parse_local_part(text) == bare


@pytest.mark.parametrize(
    "text, word",
    [
        ("x@example.test:may_send_as=", ":"),
        ("x@example.test", "@"),
        ("a:b", ":"),
        ('"a:b"', ":"),
        ('"a\\:b"', ":"),
        ('"a@b"', "@"),
        ("a\nb", "control"),
        ('"a\nb"', "control"),
        ("a b", "space"),
        ('"a b"', "space"),
        ("a..b", "RFC 5321"),
        (".hidden", "dot"),
        ('".hidden"', "dot"),
        ('"#x"', "#"),
        ("#x", "#"),
        ("a/b", "/"),
        ("alice+tag", "+"),
        ("a" * 65, "64"),
        ("é" * 33, "64"),  # 66 octets
        ("", "empty"),
        ('""', "empty"),
    ],
)
def test_local_parts_refused(text: str, word: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_local_part(text)
    assert word in str(caught.value)


def test_writing_a_bad_address_is_refused_and_leaves_the_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    write_users(path, {"alice@example.test": UserEntry("alice@example.test", HASH)})
    before = path.read_bytes()
    bad = "x@example.test:may_send_as=@example.test"
    with pytest.raises(UsersFileError) as caught:
        write_users(path, {"alice@example.test": UserEntry("alice@example.test", HASH), bad: UserEntry(bad, HASH)})
    assert bad in str(caught.value)
    assert path.read_bytes() == before


@pytest.mark.parametrize("senders", [("a\nb@x.test",), ("a@x.test\nb@x.test",), ("a@x\u2028.test",)])
def test_may_send_as_with_a_newline_is_refused(senders: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        parse_send_as(",".join(senders))


def test_a_bad_local_part_in_the_file_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice@example.test:{HASH}\na:b@example.test:{HASH}\n")
    with pytest.raises(UsersFileError) as caught:
        read_users(path)
    assert f"{path}:2:" in str(caught.value)


def test_the_daemon_serves_the_good_lines_of_a_file_it_never_read_whole(tmp_path: Path) -> None:
    # What `user add 'x@example.test:may_send_as=@example.test'` wrote before it was refused:
    # the daemon started afterwards knew no user at all (550 5.1.1 for real users).
    path = tmp_path / "users"
    path.write_text(f"alice@example.test:{HASH}\nx@example.test:may_send_as=@example.test:{HASH}\n"
                    f"bob@example.test:{HASH}\n")
    users = UsersFile(path)
    assert sorted(users.entries()) == ["alice@example.test", "bob@example.test"]
    # Once read whole, an edit that breaks a line keeps what was last read whole (and is logged).
    path.write_text(f"alice@example.test:{HASH}\ncarol@example.test:{HASH}\n")
    assert sorted(users.entries()) == ["alice@example.test", "carol@example.test"]
    path.write_text(f"alice@example.test:{HASH}\nbroken line\n")
    assert sorted(users.entries()) == ["alice@example.test", "carol@example.test"]


def test_admin_flag_round_trip(tmp_path: Path) -> None:
    """The web console's flag: a further option, written after may_send_as; `admin=no` reads as none."""
    path = tmp_path / "users"
    entries = {"ann@example.test": UserEntry("ann@example.test", HASH, ("@campaign.test",), admin=True),
               "bob@example.test": UserEntry("bob@example.test", HASH)}
    write_users(path, entries)
    assert path.read_text().splitlines() == [f"ann@example.test:{HASH}:may_send_as=@campaign.test:admin=yes",
                                             f"bob@example.test:{HASH}"]
    assert read_users(path) == entries
    path.write_text(f"bob@example.test:{HASH}:admin=no\n")
    assert read_users(path)["bob@example.test"].admin is False
    path.write_text(f"bob@example.test:{HASH}:admin=maybe\n")
    with pytest.raises(UsersFileError, match="admin=yes"):
        read_users(path)
