"""The pickup folder (mailhost.doors.pickup): what the daemon cannot read is said, once, and kept.

Before, a pickup file the daemon could not read (sendmail run as root wrote it 0600 root's)
was moved aside without a log line: for the sender, mail lost. A pickup folder it could not
read was a traceback every five seconds, forever."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from twisted.internet.defer import succeed
from twisted.logger import capturedLogs, formatEvent

from mailhost.doors.pickup import PickupCollector, drop, pickup_dir, scan


class RunAtOnce:
    """A DiskWriter that runs the work in the calling thread."""

    def run(self, function, *args):
        return succeed(function(*args))


def collector(state_dir: Path) -> PickupCollector:
    return PickupCollector(state_dir, RunAtOnce(), intake=None, hostname="mail.example.test")  # type: ignore[arg-type]


def errors_of(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"].name in ("error", "critical")]


def test_a_file_the_daemon_cannot_read_is_kept_and_said_once(tmp_path: Path, monkeypatch) -> None:
    pickup_id = drop(tmp_path, "cron@example.test", ["alice@example.test"], "uid 0 (root)", b"Subject: x\n\nx\n")
    unreadable = pickup_dir(tmp_path) / pickup_id
    real_read_bytes = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path.name == pickup_id:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with capturedLogs() as events:
        collector(tmp_path).collect()
    [line] = errors_of(events)
    aside = tmp_path / "spool" / f"pickup-bad-{pickup_id}"
    assert f"pickup {pickup_id}" in line and "Permission denied" in line and str(aside) in line
    assert not unreadable.exists()
    monkeypatch.undo()
    assert json.loads(aside.read_bytes().split(b"\n", 1)[0])["recipients"] == ["alice@example.test"]  # not lost


def test_a_file_that_is_not_a_pickup_file_is_set_aside_and_said(tmp_path: Path) -> None:
    folder = pickup_dir(tmp_path)
    folder.mkdir(parents=True)
    for name, data in (("LIST", b"[1, 2]\nx\n"), ("GARBAGE", b"\x00\xff\n")):
        (folder / name).write_bytes(data)
    found = scan(tmp_path)
    assert found.entries == []
    assert sorted(line.split(":")[0] for line in found.problems) == ["pickup GARBAGE", "pickup LIST"]
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["pickup", "pickup-bad-GARBAGE", "pickup-bad-LIST"]


def test_a_folder_the_daemon_cannot_read_is_one_line_once(tmp_path: Path, monkeypatch) -> None:
    drop(tmp_path, "cron@example.test", ["alice@example.test"], "uid 0 (root)", b"Subject: x\n\nx\n")
    folder = str(pickup_dir(tmp_path))
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path) == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    pickup = collector(tmp_path)
    with capturedLogs() as events:
        for _ in range(3):  # the daemon looks every few seconds
            pickup.collect()
    [line] = errors_of(events)
    assert f"cannot read {folder}: Permission denied" in line and "Traceback" not in line
    assert os.listdir(folder)  # the message waits there for the folder to be fixed
