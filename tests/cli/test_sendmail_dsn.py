"""`mailhost sendmail`'s delivery notification options (Postfix's -N, -R, -V) and the pickup
file that carries them to the daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailhost.cli.sendmail import SendmailError, parse_args
from mailhost.doors.pickup import drop, scan


def test_dsn_options_are_read() -> None:
    args = parse_args(["-N", "success,delay", "-Rhdrs", "-V", "job-17", "-i", "bob@example.test"])
    assert (args.notify, args.ret, args.envid) == (["SUCCESS", "DELAY"], "HDRS", "job-17")
    assert args.recipients == ["bob@example.test"]
    assert parse_args(["-Nnever", "x@example.test"]).notify == ["NEVER"]


@pytest.mark.parametrize("argv, says", [
    (["-N", "sometimes"], "-N sometimes"),
    (["-N", "never,success"], "-N never,success"),
    (["-R", "all"], "-R all"),
    (["-V", "two words\t"], "-V"),
    (["-V", "x" * 101], "-V"),
    (["-N"], "-N needs a value"),
])
def test_bad_dsn_options_are_one_line(argv: list[str], says: str) -> None:
    with pytest.raises(SendmailError, match=says.replace(",", ",")):
        parse_args(argv)


def test_the_pickup_file_carries_them(tmp_path: Path) -> None:
    drop(tmp_path, "alice@example.test", ["bob@example.test"], "uid 0", b"Subject: x\n\nhi\n",
         {"notify": ["SUCCESS"], "ret": "FULL", "envid": "job-17"})
    drop(tmp_path, "alice@example.test", ["bob@example.test"], "uid 0", b"Subject: y\n\nhi\n")
    entries = sorted(scan(tmp_path).entries, key=lambda e: e.message)
    assert [(e.notify, e.ret, e.envid) for e in entries] == [(["SUCCESS"], "FULL", "job-17"), (None, None, None)]
