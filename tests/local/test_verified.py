"""Coalesced and remembered password checks (mailhost.local.verified), on a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailhost.local.users import hash_password
from mailhost.local.verified import PasswordVerifier, VerifiedCache

CHEAP = 4  # scrypt cost for tests: what is cached, not the hash's cost, is under test
STORED = hash_password("right", log_n=CHEAP)
ALICE = "alice@example.test"


class HeldRunner:
    """The auth thread pool's stand-in: counts checks, and answers only on release()."""

    def __init__(self) -> None:
        self.held: list[tuple[defer.Deferred, Callable[[], Any]]] = []
        self.calls = 0

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        self.calls += 1
        deferred: defer.Deferred = defer.Deferred()
        self.held.append((deferred, lambda: function(*args)))
        return deferred

    def release(self) -> None:
        held, self.held = self.held, []
        for deferred, call in held:
            deferred.callback(call())


def results(deferreds: list[defer.Deferred]) -> list[Any]:
    out: list[Any] = []
    for deferred in deferreds:
        deferred.addBoth(out.append)
    return out


@pytest.fixture
def clock() -> Clock:
    return Clock()


def verifier(clock: Clock, **cache: Any) -> tuple[PasswordVerifier, HeldRunner, VerifiedCache]:
    runner = HeldRunner()
    remembered = VerifiedCache(clock, **cache)
    return PasswordVerifier(runner, remembered), runner, remembered


def test_ten_identical_checks_at_once_cost_one_scrypt_and_then_none(clock: Clock) -> None:
    checks, runner, _ = verifier(clock)
    answers = results([checks.verify(ALICE, "right", STORED, cacheable=True) for _ in range(10)])
    assert runner.calls == 1 and answers == []
    runner.release()
    assert answers == [True] * 10
    assert results([checks.verify(ALICE, "right", STORED, cacheable=True)]) == [True]  # remembered
    assert runner.calls == 1


def test_a_wrong_password_in_the_burst_has_its_own_check_and_is_never_remembered(clock: Clock) -> None:
    checks, runner, remembered = verifier(clock)
    right = results([checks.verify(ALICE, "right", STORED, cacheable=True) for _ in range(5)])
    wrong = results([checks.verify(ALICE, "wrong", STORED, cacheable=True) for _ in range(3)])
    assert runner.calls == 2
    runner.release()
    assert right == [True] * 5 and wrong == [False] * 3
    assert len(remembered) == 1
    # A failure is paid in full each time: nothing about it is kept.
    results([checks.verify(ALICE, "wrong", STORED, cacheable=True)])
    assert runner.calls == 3


def test_not_cacheable_is_checked_every_time(clock: Clock) -> None:
    # The dummy hash of a name that is no user: an unknown name always costs a full scrypt.
    checks, runner, remembered = verifier(clock)
    for expected_calls in (1, 2):
        answers = results([checks.verify("nobody@example.test", "right", STORED, cacheable=False)])
        runner.release()
        assert answers == [True] and runner.calls == expected_calls
    assert len(remembered) == 0


def test_a_check_that_fails_fails_every_waiter_and_is_not_remembered(clock: Clock) -> None:
    checks, runner, remembered = verifier(clock)
    answers = results([checks.verify(ALICE, "right", STORED, cacheable=True) for _ in range(3)])
    held, runner.held = runner.held, []
    held[0][0].errback(MemoryError("scrypt could not allocate"))
    assert [a.check(MemoryError) for a in answers] == [MemoryError] * 3
    assert len(remembered) == 0
    results([checks.verify(ALICE, "right", STORED, cacheable=True)])
    assert runner.calls == 2  # checked again, not joined to the failed one


def test_entries_expire_after_the_ttl_from_the_check(clock: Clock) -> None:
    remembered = VerifiedCache(clock, ttl=600)
    key = remembered.key(ALICE, STORED, "right")
    remembered.add(key)
    clock.advance(599)
    assert key in remembered  # a hit does not extend the lifetime
    clock.advance(1)
    assert key not in remembered and len(remembered) == 0


def test_entries_are_bounded_oldest_out_first(clock: Clock) -> None:
    remembered = VerifiedCache(clock, max_entries=3)
    keys = [remembered.key(f"u{n}@example.test", STORED, "right") for n in range(5)]
    for key in keys:
        clock.advance(1)
        remembered.add(key)
    assert len(remembered) == 3
    assert [key in remembered for key in keys] == [False, False, True, True, True]


@pytest.mark.parametrize("user, stored, password", [
    ("bob@example.test", STORED, "right"),              # another user
    (ALICE, hash_password("right", log_n=CHEAP), "right"),  # the password was set again (new salt)
    (ALICE, STORED, "wrong"),                           # another password
    (ALICE, STORED, "Right"),
    (ALICE, STORED, "right "),
], ids=["other-user", "password-set-again", "wrong", "case", "trailing-space"])  # salts are random: fixed ids
def test_key_matches_only_the_same_user_hash_and_password(clock: Clock, user: str, stored: str, password: str) -> None:
    remembered = VerifiedCache(clock)
    remembered.add(remembered.key(ALICE, STORED, "right"))
    assert remembered.key(user, stored, password) not in remembered
    assert remembered.key(ALICE, STORED, "right") in remembered


def test_the_password_is_not_in_the_key_and_keys_differ_per_process(clock: Clock) -> None:
    one, other = VerifiedCache(clock), VerifiedCache(clock)
    key = one.key(ALICE, STORED, "right")
    assert "right" not in repr(key) and b"right" not in key[2]
    assert other.key(ALICE, STORED, "right") != key  # each cache has its own HMAC key
