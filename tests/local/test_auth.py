"""SMTP AUTH's back end (mailhost.local.auth): the twisted.cred checker over the users files, and the slow-down."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock

from mailhost.local.auth import AuthSlowdown, IMailSubmitter, Submitter, SubmitterRealm, UsersFileChecker
from mailhost.config import load
from mailhost.local.mailbox import LocalDomains
from mailhost.local.users import UserEntry, hash_password, write_users

CONFIG = """
[[listener]]
role = "mx"
endpoint = "tcp:2525:interface=127.0.0.1"

[[domain]]
name = "example.test"
users = "users"
"""

CHEAP = 4  # scrypt cost for tests: the checker's logic, not its cost, is under test here
DUMMY = hash_password("never matches", log_n=CHEAP)


class Runner:
    """Stands in for the auth thread pool: runs at once, and remembers what it was asked to run."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        self.calls.append((function, args))
        return defer.maybeDeferred(function, *args)


@pytest.fixture
def domains(tmp_path: Path) -> LocalDomains:
    (tmp_path / "mailhost.toml").write_text(CONFIG)
    write_users(tmp_path / "users", {"alice@example.test": UserEntry("alice@example.test", hash_password("right", log_n=CHEAP))})
    return LocalDomains(load(tmp_path / "mailhost.toml"))


def outcome(deferred: defer.Deferred) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the checker must have answered (the runner is synchronous)"
    return results[0]


@pytest.mark.parametrize(
    "username, password, expected",
    [
        ("alice@example.test", "right", "alice@example.test"),
        ("Alice@EXAMPLE.test", "right", "alice@example.test"),
        ("alice@example.test", "wrong", None),
        ("alice@example.test", "", None),
        ("nobody@example.test", "right", None),
        ("alice@remote.test", "right", None),
        ("alice", "right", None),
        ("", "", None),
    ],
)
def test_checker(domains: LocalDomains, username: str, password: str, expected: str | None) -> None:
    runner = Runner()
    checker = UsersFileChecker(domains, runner, dummy_hash=DUMMY)
    result = outcome(checker.requestAvatarId(UsernamePassword(username.encode(), password.encode())))
    if expected is None:
        assert result.check(UnauthorizedLogin)
        assert password not in str(result.value) or not password  # the password is never in the error
    else:
        assert result == expected
    # Every attempt is one scrypt check on the runner (the thread pool), never on the caller's thread.
    [(function, args)] = runner.calls
    assert function.__name__ == "verify_password" and args[0] == password


def test_unknown_user_is_checked_against_the_dummy_hash(domains: LocalDomains) -> None:
    runner = Runner()
    checker = UsersFileChecker(domains, runner, dummy_hash=DUMMY)
    outcome(checker.requestAvatarId(UsernamePassword(b"nobody@example.test", b"x")))
    outcome(checker.requestAvatarId(UsernamePassword(b"alice@example.test", b"x")))
    (_, (_, unknown_hash)), (_, (_, known_hash)) = runner.calls
    assert unknown_hash == DUMMY
    assert known_hash != DUMMY and known_hash.split("$")[2] == unknown_hash.split("$")[2]  # same cost parameters


def test_default_dummy_hash_has_the_real_cost(domains: LocalDomains) -> None:
    runner = Runner()
    checker = UsersFileChecker(domains, runner)
    runner.calls.clear()
    outcome(checker.requestAvatarId(UsernamePassword(b"nobody@example.test", b"x")))
    [(_, (_, stored))] = runner.calls
    assert stored.split("$")[2] == hash_password("x").split("$")[2]


def test_a_repeated_login_is_remembered_until_the_password_changes(domains: LocalDomains, tmp_path: Path) -> None:
    runner = Runner()
    checker = UsersFileChecker(domains, runner, dummy_hash=DUMMY, clock=Clock())
    right = UsernamePassword(b"alice@example.test", b"right")
    assert outcome(checker.requestAvatarId(right)) == "alice@example.test"
    assert outcome(checker.requestAvatarId(right)) == "alice@example.test"
    assert len(runner.calls) == 1  # the second login cost no scrypt
    # `mailhost user passwd`, then SIGHUP: the stored hash changed, so the old password is checked, and refused.
    changed = UserEntry("alice@example.test", hash_password("new", log_n=CHEAP))
    write_users(tmp_path / "users", {"alice@example.test": changed})
    domains.reload_users()
    assert outcome(checker.requestAvatarId(right)).check(UnauthorizedLogin)
    assert outcome(checker.requestAvatarId(UsernamePassword(b"alice@example.test", b"new"))) == "alice@example.test"
    # Removed: the dummy hash is checked, never a remembered success.
    write_users(tmp_path / "users", {})
    domains.reload_users()
    calls = len(runner.calls)
    assert outcome(checker.requestAvatarId(UsernamePassword(b"alice@example.test", b"new"))).check(UnauthorizedLogin)
    assert len(runner.calls) == calls + 1


def test_realm_gives_a_submitter() -> None:
    interface, avatar, logout = SubmitterRealm().requestAvatar("alice@example.test", None, IMailSubmitter)
    assert interface is IMailSubmitter and avatar == Submitter("alice@example.test")
    logout()


# --- slow-down -------------------------------------------------------------------


def test_slowdown_starts_after_the_free_failures_and_doubles() -> None:
    clock = Clock()
    slowdown = AuthSlowdown(clock, free=3, first=1.0, longest=30.0)
    delays = []
    for _ in range(9):
        delays.append(slowdown.delay("192.0.2.1"))
        slowdown.failed("192.0.2.1")
    assert delays == [0, 0, 0, 1, 2, 4, 8, 16, 30]
    assert slowdown.delay("192.0.2.2") == 0  # per address


def test_slowdown_forgets_an_address_after_a_quiet_while() -> None:
    clock = Clock()
    slowdown = AuthSlowdown(clock, free=1, forget_after=900)
    slowdown.failed("192.0.2.1")
    slowdown.failed("192.0.2.1")
    assert slowdown.delay("192.0.2.1") == 2
    clock.advance(899)
    assert slowdown.delay("192.0.2.1") == 2
    assert slowdown.failed("192.0.2.1") == 3  # a failure restarts the quiet while
    clock.advance(901)
    assert slowdown.delay("192.0.2.1") == 0
    assert slowdown.failed("192.0.2.1") == 1


def test_slowdown_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AuthSlowdown, "MAX_ADDRESSES", 10)
    clock = Clock()
    slowdown = AuthSlowdown(clock, free=1)
    for n in range(25):
        clock.advance(1)
        slowdown.failed(f"192.0.2.{n}")
    assert len(slowdown._records) <= 10
    assert slowdown.delay("192.0.2.24") == 1  # the newest are kept
