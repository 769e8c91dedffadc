"""SMTP AUTH's back end: twisted.cred over the users files, and the per-address slow-down.

The scrypt check (~0.1 s of CPU and 32 MiB) runs on a small thread pool, never
on the reactor thread. A name that is no user is checked against a dummy hash
of the same cost, so the time to a 535 does not tell whether a user exists.
A burst of logins with one credential costs one scrypt (mailhost.local.verified).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface, implementer

from mailhost.local.mailbox import LocalDomains
from mailhost.local.users import hash_password
from mailhost.local.verified import PasswordVerifier, Runner, VerifiedCache


class IMailSubmitter(Interface):
    """An authenticated user of the submission roles."""

    address = Attribute("The user's address as the users file has it (lower case).")


@implementer(IMailSubmitter)
@dataclass(frozen=True)
class Submitter:
    address: str


class UnsupportedAvatar(LookupError):
    """A portal asked the realm for an avatar interface it does not serve (a programming error)."""


@implementer(IRealm)
class SubmitterRealm:
    """Turns the checker's avatar id (the user's address) into a Submitter."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Submitter, Callable[[], None]]:
        if IMailSubmitter not in interfaces:
            raise UnsupportedAvatar(f"mailhost's realm only has IMailSubmitter avatars, not {interfaces!r}")
        return IMailSubmitter, Submitter(avatarId), lambda: None


@implementer(ICredentialsChecker)
class UsersFileChecker:
    """Username (the full address) and password against the users files of the local domains."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, domains: LocalDomains, run: Runner, dummy_hash: str | None = None,
                 clock: IReactorTime | None = None) -> None:
        self._domains = domains
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self._verifier = PasswordVerifier(run, VerifiedCache(clock))
        # Same parameters as a real user's hash, so an unknown user costs the same.
        self._dummy_hash = dummy_hash or hash_password(secrets.token_urlsafe(16))

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        username = _text(credentials.username)
        password = _text(credentials.password)
        entry = self._domains.user(username) if "@" in username else None
        stored = entry.password_hash if entry is not None else self._dummy_hash

        def decided(matches: bool) -> str:
            if not matches or entry is None:
                raise UnauthorizedLogin("bad username or password")
            return entry.address

        # The dummy hash's check is never cached: an unknown name always costs a full scrypt.
        name = entry.address if entry is not None else username
        return self._verifier.verify(name, password, stored, cacheable=entry is not None).addCallback(decided)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def make_portal(domains: LocalDomains, run: Runner, clock: IReactorTime | None = None) -> Portal:
    return Portal(SubmitterRealm(), [UsersFileChecker(domains, run, clock=clock)])


@dataclass
class _Record:
    failures: int
    last: float


class AuthSlowdown:
    """Per client address: once it has failed `free` times, every further AUTH
    attempt from it waits before it is checked, twice as long after each
    failure (up to `longest`). Waiting before the check, not before the 535,
    means a client cannot learn the answer early by timing out. An address is
    forgotten `forget_after` seconds after its last failure.
    """

    MAX_ADDRESSES = 10000

    def __init__(self, clock: IReactorTime, free: int, first: float = 1.0, longest: float = 30.0,
                 forget_after: float = 900.0) -> None:
        self._clock = clock
        self._free = free
        self._first = first
        self._longest = longest
        self._forget_after = forget_after
        self._records: dict[str, _Record] = {}

    def delay(self, address: str) -> float:
        """Seconds the next attempt from `address` waits."""
        record = self._current(address)
        if record is None or record.failures < self._free:
            return 0.0
        return min(self._first * 2 ** (record.failures - self._free), self._longest)

    def failed(self, address: str) -> int:
        """Count a failure; returns how many `address` has had (while remembered)."""
        record = self._current(address) or _Record(0, 0.0)
        record.failures += 1
        record.last = self._clock.seconds()
        self._records[address] = record
        if len(self._records) > self.MAX_ADDRESSES:
            self._prune()
        return record.failures

    def _current(self, address: str) -> _Record | None:
        record = self._records.get(address)
        if record is not None and self._clock.seconds() - record.last > self._forget_after:
            del self._records[address]
            return None
        return record

    def _prune(self) -> None:
        # Bounded memory under a spread-out attack: drop the forgotten, then the oldest.
        now = self._clock.seconds()
        self._records = {a: r for a, r in self._records.items() if now - r.last <= self._forget_after}
        if len(self._records) > self.MAX_ADDRESSES:
            newest = sorted(self._records.items(), key=lambda item: item[1].last)[-self.MAX_ADDRESSES // 2:]
            self._records = dict(newest)
