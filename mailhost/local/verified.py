"""Password checks without paying scrypt again for a credential just proven.

A campaign tool opens ten connections at once, all with the same account: ten
scrypt checks (~0.1-0.4 s of CPU and 32 MiB each) on two threads took seconds.
Here identical checks in flight share one scrypt, and a success is remembered
for a few minutes, so the burst costs one check. The stored hash keeps its cost.

What is remembered is a success only, keyed by the user, the stored hash string
(a `mailhost user passwd` or removal changes it, so the entry no longer
matches) and an HMAC of the password under a key made at start and never
written anywhere: the password itself is never kept, and a wrong password
never matches. Entries expire after `ttl` seconds and there are at most
`max_entries` of them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mailhost.local.users import verify_password

# Blocking work off the reactor: run(function, *args) -> Deferred of its result.
Runner = Callable[..., Deferred]

# (user, stored hash, HMAC-SHA256 of the password)
Key = tuple[str, str, bytes]


class VerifiedCache:
    """Successful verifications, for `ttl` seconds from the check, at most `max_entries`."""

    def __init__(self, clock: IReactorTime, ttl: float = 600.0, max_entries: int = 1024) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max_entries = max_entries
        self._secret = secrets.token_bytes(32)  # per process: an entry means nothing outside it
        self._expires: OrderedDict[Key, float] = OrderedDict()  # oldest first

    def key(self, user: str, stored: str, password: str) -> Key:
        mac = hmac.new(self._secret, password.encode("utf-8"), hashlib.sha256).digest()
        return user, stored, mac

    def __contains__(self, key: Key) -> bool:
        expires = self._expires.get(key)
        if expires is None:
            return False
        if self._clock.seconds() >= expires:
            del self._expires[key]
            return False
        return True

    def __len__(self) -> int:
        return len(self._expires)

    def add(self, key: Key) -> None:
        # A fixed lifetime from the scrypt check that proved it; a hit does not extend it.
        self._expires.pop(key, None)
        self._expires[key] = self._clock.seconds() + self._ttl
        while len(self._expires) > self._max_entries:
            self._expires.popitem(last=False)


class PasswordVerifier:
    """verify_password on the runner, with identical checks in flight coalesced and
    successes for real users served from a VerifiedCache."""

    def __init__(self, run: Runner, cache: VerifiedCache) -> None:
        self._run = run
        self._cache = cache
        self._pending: dict[Key, list[Deferred[bool]]] = {}

    def verify(self, user: str, password: str, stored: str, cacheable: bool) -> Deferred[bool]:
        """Whether `password` matches `stored`; `cacheable` is False for the dummy hash of
        a name that is no user, so its check is always paid in full."""
        key = self._cache.key(user, stored, password)
        if cacheable and key in self._cache:
            return succeed(True)
        waiting: Deferred[bool] = Deferred()
        if key in self._pending:
            # The same user, hash and password already on a thread: the same answer, one scrypt.
            self._pending[key].append(waiting)
            return waiting
        self._pending[key] = [waiting]
        self._run(verify_password, password, stored).addBoth(self._decided, key, cacheable)
        return waiting

    def _decided(self, result: bool | Failure, key: Key, cacheable: bool) -> None:
        waiters = self._pending.pop(key)
        if result is True and cacheable:
            self._cache.add(key)
        for waiting in waiters:
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)
