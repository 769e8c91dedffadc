"""The `mailhost` admin command and the `twistd mailhost` plugin, run as real processes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mailhost.local.users import read_users, verify_password

BIN = Path(sys.executable).parent
MAILHOST = BIN / "mailhost"
TWISTD = BIN / "twistd"

CONFIG = """
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

[[domain]]
name = "other.test"
maildir = "mail/other.test"
users = "users"
"""

PASSWORD = "correct horse battery staple"


class Setup:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "mailhost.toml"
        self.config.write_text(CONFIG)
        self.users = root / "users"
        self.maildir = root / "mail" / "example.test"

    def run(self, *args: str, input: str | None = None, config: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(MAILHOST), "--config", str(config or self.config), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.root,
        )

    def add(self, address: str, password: str = PASSWORD) -> subprocess.CompletedProcess:
        return self.run("user", "add", address, "--password-stdin", input=password + "\n")

    def listed(self) -> list[str]:
        result = self.run("user", "list")
        assert result.returncode == 0, result.stderr
        return result.stdout.split()


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    root = tmp_path / "site"
    root.mkdir()
    return Setup(root)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int = 1, *names: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], lines[0]


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# --- check-config ----------------------------------------------------------------


def test_check_config_ok(setup: Setup) -> None:
    result = setup.run("check-config")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert str(setup.config) in result.stdout and "ok" in result.stdout


@pytest.mark.parametrize("line, says", [("", "(workers = auto: one per usable core)"), ("workers = 3", "3 processes)"),
                                        ("workers = 1", "1 process)")])
def test_check_config_says_how_many_processes(setup: Setup, line: str, says: str) -> None:
    setup.config.write_text(setup.config.read_text().replace("[server]\n", f"[server]\n{line}\n", 1))
    result = setup.run("check-config")
    assert result.returncode == 0, result.stderr
    assert says in result.stdout


BROKEN = [
    ("[limits]\ngreet_pauze = '1s'\n" + CONFIG, "greet_pauze"),
    ("[queue]\nlifetime = 'forever'\n" + CONFIG, "queue.lifetime"),
    (CONFIG.replace('role = "mx"', 'role = "relay"'), "role"),
    (CONFIG.replace("tcp:2525:interface=127.0.0.1", "nonsense:2525"), "endpoint"),
    (CONFIG + "[relay]\nnetworks = ['10.0.0.0/33']\n", "relay.networks"),
    (CONFIG.replace('name = "other.test"', 'name = "example.test"'), "domain[1].name"),
    (CONFIG + "[[listener]\n", "line"),
    (CONFIG.replace("[server]\n", "[server]\nworkers = 'many'\n", 1), "server.workers"),
]


@pytest.mark.parametrize("text, key", BROKEN, ids=[key for _, key in BROKEN])
def test_check_config_broken(setup: Setup, text: str, key: str) -> None:
    setup.config.write_text(text)
    result = setup.run("check-config")
    assert_one_line_error(result, 1, key, str(setup.config))
    assert result.stdout == ""


def test_check_config_missing_file(setup: Setup) -> None:
    missing = setup.root / "nowhere.toml"
    assert_one_line_error(setup.run("check-config", config=missing), 1, str(missing))


def test_check_config_malformed_users_file(setup: Setup) -> None:
    setup.users.write_text("this line has no separator\n")
    assert_one_line_error(setup.run("check-config"), 1, str(setup.users))


def test_broken_config_fails_user_commands_too(setup: Setup) -> None:
    setup.config.write_text("bogus = 1\n" + CONFIG)
    assert_one_line_error(setup.add("alice@example.test"), 1, "bogus")
    assert not setup.users.exists()


# --- usage errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["user"],
        ["user", "frobnicate"],
        ["user", "add"],
        ["user", "add", "a@example.test", "b@example.test"],
        ["user", "list", "extra"],
        ["user", "add", "a@example.test", "--no-such-option"],
        ["check-config", "extra"],
    ],
    ids=lambda args: " ".join(args) or "(nothing)",
)
def test_usage_errors_exit_2(setup: Setup, args: list[str]) -> None:
    result = setup.run(*args, input="")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() != ""
    assert not setup.users.exists()


def test_missing_config_value_is_a_usage_error(setup: Setup) -> None:
    result = subprocess.run([str(MAILHOST), "--config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_help_exits_0(setup: Setup) -> None:
    result = setup.run("--help")
    assert result.returncode == 0 and "check-config" in result.stdout


# --- users -------------------------------------------------------------------------


def test_user_add_list_passwd_del(setup: Setup) -> None:
    result = setup.add("alice@example.test")
    assert result.returncode == 0, result.stderr
    assert setup.add("Bob@Example.TEST", "bob's own password").returncode == 0
    assert setup.add("carol@other.test").returncode == 0
    assert setup.listed() == ["alice@example.test", "bob@example.test", "carol@other.test"]

    # the Maildir exists, owner-only
    for sub in ("tmp", "new", "cur"):
        folder = setup.maildir / "alice" / sub
        assert folder.is_dir(), folder
    assert (setup.root / "mail" / "other.test" / "carol" / "new").is_dir()

    # the users file: hashes only, owner-only, verifiable
    raw = setup.users.read_bytes()
    assert PASSWORD.encode() not in raw and b"bob's own password" not in raw
    assert stat.S_IMODE(os.stat(setup.users).st_mode) == 0o600
    entries = read_users(setup.users)
    assert verify_password(PASSWORD, entries["alice@example.test"].password_hash)
    assert not verify_password("wrong password", entries["alice@example.test"].password_hash)
    assert not verify_password(PASSWORD, entries["bob@example.test"].password_hash)
    assert verify_password("bob's own password", entries["bob@example.test"].password_hash)
    assert entries["alice@example.test"].password_hash != entries["carol@other.test"].password_hash  # salted

    # passwd
    result = setup.run("user", "passwd", "alice@example.test", "--password-stdin", input="new secret\n")
    assert result.returncode == 0, result.stderr
    entries = read_users(setup.users)
    assert verify_password("new secret", entries["alice@example.test"].password_hash)
    assert not verify_password(PASSWORD, entries["alice@example.test"].password_hash)
    assert verify_password("bob's own password", entries["bob@example.test"].password_hash)  # untouched
    assert stat.S_IMODE(os.stat(setup.users).st_mode) == 0o600
    assert b"new secret" not in setup.users.read_bytes()

    # del keeps the Maildir
    result = setup.run("user", "del", "alice@example.test")
    assert result.returncode == 0, result.stderr
    assert setup.listed() == ["bob@example.test", "carol@other.test"]
    assert (setup.maildir / "alice" / "new").is_dir()
    assert_one_line_error(setup.run("user", "del", "alice@example.test"), 1, "alice@example.test")


def test_user_add_duplicate(setup: Setup) -> None:
    assert setup.add("alice@example.test").returncode == 0
    before = setup.users.read_bytes()
    assert_one_line_error(setup.add("alice@example.test", "another"), 1, "alice@example.test")
    assert_one_line_error(setup.add("ALICE@example.test", "another"), 1, "alice@example.test")
    assert setup.users.read_bytes() == before


def test_user_passwd_unknown(setup: Setup) -> None:
    result = setup.run("user", "passwd", "nobody@example.test", "--password-stdin", input="x\n")
    assert_one_line_error(result, 1, "nobody@example.test")
    assert not setup.users.exists()


def test_user_add_empty_password(setup: Setup) -> None:
    assert_one_line_error(setup.run("user", "add", "alice@example.test", "--password-stdin", input="\n"), 1)
    assert_one_line_error(setup.run("user", "add", "alice@example.test", "--password-stdin", input=""), 1)
    assert not setup.users.exists()
    assert not (setup.maildir / "alice").exists()


@pytest.mark.parametrize(
    "address, names",
    [
        ("alice@remote.test", ["remote.test"]),
        ("alice@example.test.evil", ["example.test.evil"]),
        ("alice", ["alice"]),
        ("@example.test", []),
        ("alice@", []),
    ],
)
def test_user_add_not_a_local_address(setup: Setup, address: str, names: list[str]) -> None:
    before = all_files(setup.root)
    assert_one_line_error(setup.add(address), 1, *names)
    assert all_files(setup.root) == before


@pytest.mark.parametrize(
    "local",
    ["../evil", "a/b", "..", ".", "../../evil", ".hidden", "a/../../evil", "a b", "alice+tag",
     "x@example.test:may_send_as=", "a:b", '"a:b"', "a\nb", "#x", "a" * 65],
)
def test_user_add_unsafe_local_part(tmp_path: Path, setup: Setup, local: str) -> None:
    before = all_files(tmp_path)
    result = setup.add(f"{local}@example.test")
    assert_one_line_error(result, 1)
    assert all_files(tmp_path) == before  # nothing created anywhere, inside or outside the maildir
    assert not (tmp_path / "evil").exists() and not (setup.root / "mail" / "evil").exists()


def test_user_add_with_what_the_users_file_format_uses_keeps_the_file_working(setup: Setup) -> None:
    # Accepted before: the line it wrote broke every later `user` command and check-config.
    assert setup.add("alice@example.test").returncode == 0
    before = setup.users.read_bytes()
    for address in ("x@example.test:may_send_as=@example.test", "a:b@example.test"):
        assert_one_line_error(setup.add(address), 1, "cannot be a mailbox name")
    assert setup.users.read_bytes() == before
    assert setup.listed() == ["alice@example.test"]
    assert setup.run("check-config").returncode == 0
    assert sorted(p.name for p in setup.maildir.iterdir()) == ["alice"]


def test_user_add_quoted_local_part_is_the_same_mailbox(setup: Setup) -> None:
    assert setup.add('"alice"@example.test').returncode == 0
    assert setup.listed() == ["alice@example.test"]
    assert (setup.maildir / "alice" / "new").is_dir()


def test_a_bad_line_already_in_the_users_file_is_named_by_every_command(setup: Setup) -> None:
    setup.users.write_text("# users\nalice@example.test:$scrypt$x\nx@example.test:may_send_as=@example.test:$scrypt$y\n")
    for result in (setup.run("user", "list"), setup.add("bob@example.test"), setup.run("check-config"),
                   setup.run("user", "del", "alice@example.test")):
        assert_one_line_error(result, 1, f"{setup.users}:3:")


# --- the twistd plugin --------------------------------------------------------------


def test_twistd_finds_the_mailhost_plugin(tmp_path: Path) -> None:
    # From a folder outside the checkout: the plugin must come from the installed package.
    result = subprocess.run([str(TWISTD), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    commands = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ") and line.split()]
    assert "mailhost" in commands, result.stdout


@pytest.mark.parametrize(
    "text, key",
    [
        ("[limits]\ngreet_pauze = '1s'\n" + CONFIG, "greet_pauze"),
        (CONFIG.replace('role = "mx"', 'role = "relay"'), "role"),
    ],
)
def test_twistd_with_a_broken_config(setup: Setup, text: str, key: str) -> None:
    setup.config.write_text(text)
    result = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "mailhost", "--config", str(setup.config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=setup.root,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert key in lines[0] and str(setup.config) in lines[0]
    assert not (setup.root / "state").exists()  # nothing started


def test_twistd_with_a_missing_config(setup: Setup) -> None:
    missing = setup.root / "nowhere.toml"
    result = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "mailhost", "--config", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=setup.root,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(missing) in lines[0], output


def test_user_may_send_as_set_show_clear_and_kept_by_passwd(setup: Setup) -> None:
    assert setup.add("news@example.test").returncode == 0
    result = setup.run("user", "may-send-as", "news@example.test", "info@example.test", "@Campaign.test")
    assert result.returncode == 0, result.stderr
    assert "info@example.test @campaign.test" in result.stdout
    assert read_users(setup.users)["news@example.test"].may_send_as == ("info@example.test", "@campaign.test")
    # A new password keeps the list.
    assert setup.run("user", "passwd", "news@example.test", "--password-stdin", input="other\n").returncode == 0
    entry = read_users(setup.users)["news@example.test"]
    assert entry.may_send_as == ("info@example.test", "@campaign.test") and verify_password("other", entry.password_hash)
    shown = setup.run("user", "may-send-as", "news@example.test")
    assert shown.returncode == 0 and "info@example.test @campaign.test" in shown.stdout
    assert setup.listed() == ["news@example.test"]  # `user list` output is unchanged by options
    cleared = setup.run("user", "may-send-as", "news@example.test", "--clear")
    assert cleared.returncode == 0 and "own addresses only" in cleared.stdout
    assert read_users(setup.users)["news@example.test"].may_send_as == ()


def test_user_may_send_as_errors(setup: Setup) -> None:
    assert setup.add("news@example.test").returncode == 0
    before = setup.users.read_bytes()
    for args, names in [
        (["nobody@example.test", "a@example.test"], ["nobody@example.test"]),
        (["news@example.test", "not-an-address"], ["not-an-address"]),
        (["news@example.test", "a@example.test", "--clear"], ["--clear"]),
    ]:
        assert_one_line_error(setup.run("user", "may-send-as", *args), 1, *names)
        assert setup.users.read_bytes() == before


def test_suppress_add_list_remove(tmp_path):
    config = tmp_path / "mailhost.toml"
    config.write_text(CONFIG)

    def run(*args):
        return subprocess.run([str(MAILHOST), "--config", str(config), "suppress", *args], capture_output=True, text=True)

    assert run("add", "Bob@Remote.test", "--reason", "asked to stop").returncode == 0
    listed = json.loads(run("list", "--json").stdout)["suppressed"]
    assert [(e["address"], e["reason"]) for e in listed] == [("bob@remote.test", "asked to stop")]
    assert run("remove", "bob@remote.test").returncode == 0
    again = run("remove", "bob@remote.test")
    assert again.returncode == 1 and again.stderr.count("\n") == 1


def test_user_admin_on_off_and_kept_by_passwd(setup: Setup) -> None:
    assert setup.add("ann@example.test").returncode == 0
    result = setup.run("user", "admin", "ann@example.test")
    assert result.returncode == 0 and "may now log in to the web console" in result.stdout
    assert read_users(setup.users)["ann@example.test"].admin is True
    assert setup.run("user", "passwd", "ann@example.test", "--password-stdin", input="other\n").returncode == 0
    assert read_users(setup.users)["ann@example.test"].admin is True
    off = setup.run("user", "admin", "ann@example.test", "--off")
    assert off.returncode == 0 and "may no longer" in off.stdout
    assert read_users(setup.users)["ann@example.test"].admin is False
    assert_one_line_error(setup.run("user", "admin", "nobody@example.test"), 1, "nobody@example.test")
