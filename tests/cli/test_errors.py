"""Operator mistakes and a hostile machine (no permission, a full disk) are one line and exit 1,
never a traceback. These run `mailhost.cli.main.main` in this process: the failures are made
with monkeypatch (the tests run as root, who may read anything, on a disk with room)."""

from __future__ import annotations

import errno
import io
import os
import socket
import sys
from pathlib import Path

import pytest

from mailhost.cli.main import main
from mailhost.local.users import UserEntry, write_users
from mailhost.queue.envelope import Envelope, Recipient
from mailhost.queue.spool import Spool, new_queue_id

HASH = "$scrypt$ln=15,r=8,p=1$c2FsdA$ZGlnZXN0"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "mailhost.toml").write_text("""
[server]
hostname = "mail.example.test"
state_dir = "state"

[[listener]]
role = "mx"
endpoint = "tcp:2525:interface=127.0.0.1"

[[domain]]
name = "example.test"
maildir = "mail/example.test"
users = "users"
""")
    (tmp_path / "state").mkdir(mode=0o700)
    write_users(tmp_path / "users", {"alice@example.test": UserEntry("alice@example.test", HASH)})
    return tmp_path


def run(site: Path, capsys, *args: str, stdin: bytes = b"") -> tuple[int, str]:
    """Exit status and stderr of `mailhost --config ... args`; stderr must be one line."""
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        status = main(["--config", str(site / "mailhost.toml"), *args])
    finally:
        sys.stdin = sys.__stdin__
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return status, err


def denied(path) -> PermissionError:
    return PermissionError(errno.EACCES, "Permission denied", str(path))


def test_queue_list_by_a_user_who_cannot_read_the_spool(site: Path, capsys, monkeypatch) -> None:
    spool = Spool(site / "state" / "spool")
    spool.store(Envelope(new_queue_id(), "a@example.test", [Recipient("b@remote.test")], 1.0, 1.0), [b"x\n"])
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).startswith(str(site / "state")):
            raise denied(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os.path, "isdir", lambda path: False if str(path).startswith(str(site / "state")) else True)
    status, err = run(site, capsys, "queue", "list")
    assert status == 1
    assert f"cannot read the queue in {site / 'state' / 'spool'}" in err and "root or as the owner" in err


def test_queue_flush_by_a_user_who_may_not_use_the_control_socket(site: Path, capsys, monkeypatch) -> None:
    (site / "state" / "control.sock").touch()

    def connect(self, address):
        raise denied(address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    status, err = run(site, capsys, "queue", "flush")
    assert status == 1
    assert "control.sock" in err and "root or as the owner" in err


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["writev", "fsync"])
def test_user_add_on_a_full_disk_changes_nothing(site: Path, capsys, monkeypatch, where: str) -> None:
    before = (site / "users").read_bytes()
    monkeypatch.setattr(os, where, no_space)
    status, err = run(site, capsys, "user", "add", "bob@example.test", "--password-stdin", stdin=b"pw\n")
    assert status == 1
    assert str(site / "users") in err and "No space left on device" in err
    assert (site / "users").read_bytes() == before
    assert not (site / "mail").exists()  # the Maildir it made is taken back
    assert [p.name for p in site.iterdir() if p.name.startswith(".")] == []


def test_sendmail_by_a_user_who_cannot_read_the_users_file(site: Path, capsys, monkeypatch) -> None:
    # It said "no such user" about alice, who exists.
    real_read_text = Path.read_text

    def read_text(path: Path, *args, **kwargs) -> str:
        if path == site / "users":
            raise denied(path)
        return real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    status, err = run(site, capsys, "sendmail", "alice@example.test", stdin=b"Subject: x\n\nx\n")
    assert status == 1
    assert "no such user" not in err
    assert f"{site / 'users'}: cannot read users file" in err and "root or as the owner" in err
    assert not (site / "state" / "spool").exists()


def test_sendmail_by_a_user_who_cannot_write_the_pickup_folder(site: Path, capsys, monkeypatch) -> None:
    real_mkdir = Path.mkdir

    def mkdir(path: Path, *args, **kwargs) -> None:
        if str(path).startswith(str(site / "state")):
            raise denied(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    status, err = run(site, capsys, "sendmail", "-f", "cron", "someone@remote.test", stdin=b"Subject: x\n\nx\n")
    assert status == 1
    assert "Permission denied" in err and "root or as the owner" in err
