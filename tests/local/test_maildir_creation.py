"""A mailbox's Maildir is made whole at its first delivery (mailhost.local.mailbox.create_maildir)."""

from __future__ import annotations

import mailbox
import os
from pathlib import Path

import pytest

from mailhost.local import mailbox as local_mailbox
from mailhost.local.mailbox import create_maildir


def test_a_new_maildir_appears_with_all_three_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "mail" / "example.test" / "alice"
    seen_at_rename = []
    real_rename = os.rename

    def rename(source, destination):
        # What a reader would find at the instant the folder appears.
        seen_at_rename.append((Path(destination).exists(), sorted(p.name for p in Path(source).iterdir())))
        return real_rename(source, destination)

    monkeypatch.setattr(local_mailbox.os, "rename", rename)
    created = create_maildir(target)
    assert seen_at_rename == [(False, ["cur", "new", "tmp"])]
    assert created == [tmp_path / "mail", tmp_path / "mail" / "example.test", target,
                       target / "tmp", target / "new", target / "cur"]
    assert list(mailbox.Maildir(target, create=False)) == []
    assert [p.name for p in target.parent.iterdir()] == ["alice"]  # no staging folder left
    assert oct(target.stat().st_mode & 0o777) == oct(0o700)


def test_an_existing_folder_gets_what_it_misses(tmp_path: Path) -> None:
    target = tmp_path / "alice"
    (target / "new").mkdir(parents=True)
    assert create_maildir(target) == [target / "tmp", target / "cur"]
    assert create_maildir(target) == []


def test_a_maildir_made_meanwhile_by_another_delivery_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "alice"
    real_rename = os.rename

    def rename(source, destination):
        for sub in ("tmp", "new", "cur"):  # the other delivery wins the race, with a message in it
            (Path(destination) / sub).mkdir(parents=True, exist_ok=True)
        (Path(destination) / "new" / "1.msg").write_bytes(b"Subject: first\n\nx\n")
        return real_rename(source, destination)

    monkeypatch.setattr(local_mailbox.os, "rename", rename)
    assert create_maildir(target) == []
    assert [p.name for p in (target / "new").iterdir()] == ["1.msg"]
    assert [p.name for p in tmp_path.iterdir()] == ["alice"]


def test_a_folder_that_cannot_be_made_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "example.test").write_text("a file where the domain's folder goes")
    with pytest.raises(OSError):
        create_maildir(tmp_path / "example.test" / "alice")
