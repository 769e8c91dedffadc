"""Maildir copies staged for a group commit: invisible in new/ until their data is durable."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailhost.local import mailbox as mailbox_module
from mailhost.local.mailbox import Copy, Mailbox, stage_copies


def copies(root: Path) -> list[Copy]:
    return [Copy(Mailbox("alice@example.test", root / "alice"), b"Delivered-To: alice@example.test\n"),
            Copy(Mailbox("bob@example.test", root / "bob"), b"Delivered-To: bob@example.test\n")]


def test_staged_copies_appear_in_new_only_when_published(tmp_path: Path) -> None:
    staged = stage_copies(copies(tmp_path), b"Subject: hi\n\nbody\n")
    for user in ("alice", "bob"):  # first delivery: the Maildir is made
        assert list((tmp_path / user / "new").iterdir()) == []
        assert len(list((tmp_path / user / "tmp").iterdir())) == 1
    assert set(staged.folders) == {tmp_path / "alice", tmp_path / "bob"}
    staged.publish()
    [alice] = list((tmp_path / "alice" / "new").iterdir())
    assert alice.read_bytes() == b"Delivered-To: alice@example.test\nSubject: hi\n\nbody\n"
    assert list((tmp_path / "alice" / "tmp").iterdir()) == []
    staged.undo()  # a failed sync after the renames: the message is taken back from every mailbox
    assert list((tmp_path / "alice" / "new").iterdir()) == [] and list((tmp_path / "bob" / "new").iterdir()) == []


def test_a_failure_while_staging_leaves_no_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    real = mailbox_module.write_unsynced

    def second_fails(path: str, chunks) -> None:
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        real(path, chunks)

    monkeypatch.setattr(mailbox_module, "write_unsynced", second_fails)
    with pytest.raises(OSError):
        stage_copies(copies(tmp_path), b"Subject: hi\n\nbody\n")
    assert list((tmp_path / "alice" / "tmp").iterdir()) == []
