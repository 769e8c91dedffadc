"""One owner for state (DESIGN.md): the CLI run as root leaves what it creates to the owner of
state_dir, the daemon's user. (The tests run as root; "the daemon's user" is nobody, 65534.)

Before, each of these left root-owned files the daemon, once it had dropped root, could not
read: a pickup file (mail lost), a pickup folder (PermissionError every 5 s), a users file or
Maildir (451 for every recipient), a queued envelope, the suppression list, a DKIM key."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mailhost.queue.envelope import Envelope, Recipient
from mailhost.queue.spool import Spool, new_queue_id

MAILHOST = Path(sys.executable).parent / "mailhost"
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.state.mkdir(mode=0o700)
        os.chown(self.state, NOBODY, NOBODY)
        self.config = root / "mailhost.toml"
        self.config.write_text(f"""
[server]
hostname = "mail.example.test"
state_dir = "state"

[[listener]]
role = "mx"
endpoint = "tcp:2525:interface=127.0.0.1"

[[domain]]
name = "example.test"
maildir = "state/mail/example.test"
users = "state/users"
""")

    def run(self, *args: str, input: str | bytes | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([str(MAILHOST), "--config", str(self.config), *args], input=input,
                                capture_output=True, timeout=120, cwd=self.root)
        assert result.returncode == 0, result.stderr
        return result

    def not_given(self) -> list[str]:
        """Everything under state_dir that is not the daemon's user's."""
        return [f"{p} {p.stat().st_uid}:{p.stat().st_gid}" for p in [self.state, *self.state.rglob("*")]
                if (p.stat().st_uid, p.stat().st_gid) != (NOBODY, NOBODY)]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_user_add_and_passwd_as_root(site: Site) -> None:
    site.run("user", "add", "alice@example.test", "--password-stdin", input=b"pw-one\n")
    assert (site.state / "mail" / "example.test" / "alice" / "new").is_dir()
    assert site.not_given() == []
    site.run("user", "passwd", "alice@example.test", "--password-stdin", input=b"pw-two\n")
    assert site.not_given() == []
    assert stat.S_IMODE((site.state / "users").stat().st_mode) == 0o600


def test_sendmail_as_root(site: Site) -> None:
    site.run("sendmail", "-f", "cron@example.test", "someone@remote.test", input=b"Subject: x\n\nbody\n")
    [pickup_file] = (site.state / "spool" / "pickup").iterdir()
    assert site.not_given() == []
    assert stat.S_IMODE(pickup_file.stat().st_mode) == 0o600


def test_queue_hold_and_flush_without_the_daemon_as_root(site: Site) -> None:
    spool = Spool(site.state / "spool")
    envelope = Envelope(new_queue_id(), "a@example.test", [Recipient("b@remote.test")], 100.0, 100.0)
    spool.store(envelope, [b"Subject: x\n\nx\n"])
    for path in [site.state, *site.state.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)  # as the daemon wrote them
    site.run("queue", "hold", envelope.id)
    site.run("queue", "flush")
    assert spool.load(envelope.id).held
    assert site.not_given() == []


def test_suppress_and_dkim_keygen_as_root(site: Site) -> None:
    site.run("suppress", "add", "gone@remote.test")
    site.run("dkim", "keygen", "example.test", "--selector", "s1", "--algorithm", "ed25519-sha256")
    assert (site.state / "suppression.json").exists() and (site.state / "dkim" / "example.test" / "s1.key").exists()
    assert site.not_given() == []


def test_a_state_dir_of_root_stays_root_and_nothing_is_given(tmp_path: Path) -> None:
    site = Site(tmp_path)
    os.chown(site.state, 0, 0)
    site.run("user", "add", "alice@example.test", "--password-stdin", input=b"pw\n")
    assert {p.stat().st_uid for p in site.state.rglob("*")} == {0}
