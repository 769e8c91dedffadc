"""Adaptive pacing per destination provider (AIMD).

Destinations are grouped by their MX host's domain: every `*.google.com` MX
is one group, so a campaign to gmail.com, googlemail.com and every Google
Workspace domain shares one pace. Each group has a connection limit and a
rate in messages per minute. A 421, a 4.7.x deferral or a refused connection
halves the rate (never below the floor); each clean window after that adds a
tenth of the configured rate back, up to the configured rate.

Messages over the pace are not failed and do not count an attempt: the
Deliverer hands them back as "throttled" with the time they may go, and the
scheduler puts them back in the queue for then.

A block (a policy, authentication or content refusal: feedback.classify.BLOCKING)
drops the rate to the floor at once and pauses the group for [bounces] block_pause:
while it is paused every message for the group is handed back as "throttled", so a
campaign refused for a DNS mistake waits in the queue instead of being sent into the
same refusal 50,000 times.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import DeferredSemaphore
from twisted.logger import Logger

from mailhost.config import DEFAULT_RULES, ThrottleRule  # noqa: F401 (DEFAULT_RULES: for callers)

CLEAN_WINDOW = 60.0  # seconds without a deferral before the rate grows again
UNLIMITED = 0.0

log = Logger(namespace="mailhost.outbound")  # with the "pace ... down to" lines of the deliverer


def group_of(mx_host: str, rules: tuple[ThrottleRule, ...]) -> tuple[str, ThrottleRule | None]:
    """The group name of an MX host: a matching rule's name, or the host's parent domain."""
    host = mx_host.lower().rstrip(".")
    for rule in rules:
        if any(host == d or host.endswith("." + d) for d in rule.mx_domains):
            return rule.name, rule
    labels = host.split(".")
    return ".".join(labels[-2:]) if len(labels) >= 2 else host, None


class Pace:
    """One group's token bucket and its AIMD rate."""

    def __init__(self, name: str, connections: int, rate: float, floor: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.max_rate = rate
        self.rate = rate
        self.floor = min(floor, rate) if rate else floor
        self.connections = DeferredSemaphore(connections)
        self._clock = clock
        self._next_free = clock()
        self._last_slowdown = -CLEAN_WINDOW
        self._last_growth = clock()
        self.paused_until = 0.0  # clock time; a block pauses the group until then

    def paused_for(self) -> float:
        """Seconds the group stays paused (0: not paused)."""
        return max(0.0, self.paused_until - self._clock())

    def block(self, pause: float) -> bool:
        """A block: the rate drops to the floor and the group pauses for `pause` seconds (a
        longer pause already running is kept). True when this changed something (the group
        was not paused, or its rate was above the floor): the news worth a log line."""
        now = self._clock()
        newly_paused = pause > 0 and self.paused_until <= now
        self.paused_until = max(self.paused_until, now + pause)
        lowered = self.rate != UNLIMITED and self.rate > self.floor
        if self.rate != UNLIMITED:
            self.rate = self.floor
            self._last_slowdown = now  # growth starts one clean window after the block
        return newly_paused or lowered

    def reserve(self) -> float:
        """Take the next send slot; returns how many seconds from now it is (0: go now)."""
        paused = self.paused_for()
        if paused > 0:
            return paused  # nothing reserved: the caller gives back nothing it did not take
        if self.rate == UNLIMITED:
            return 0.0
        now = self._clock()
        self._grow(now)
        slot = max(now, self._next_free)
        self._next_free = slot + 60.0 / self.rate
        return slot - now

    def give_back(self) -> None:
        """A reserved slot that was not used (the message was put back in the queue)."""
        if self.rate != UNLIMITED and not self.paused_for():
            self._next_free = max(self._clock(), self._next_free - 60.0 / self.rate)

    def slow_down(self) -> None:
        if self.rate == UNLIMITED:
            return
        now = self._clock()
        if now - self._last_slowdown < 1.0:
            return  # one burst of deferrals is one signal, not ten
        self._last_slowdown = now
        self.rate = max(self.floor, self.rate / 2)

    def _grow(self, now: float) -> None:
        if self.rate >= self.max_rate:
            return
        if now - self._last_slowdown >= CLEAN_WINDOW and now - self._last_growth >= CLEAN_WINDOW:
            self._last_growth = now
            self.rate = min(self.max_rate, self.rate + self.max_rate / 10)
            log.info("pace for {group} up to {rate:.0f}/min (at most {max_rate:.0f}/min)", group=self.name,
                     rate=self.rate, max_rate=self.max_rate)


class Throttle:
    """The paces of every destination group seen so far.

    With `share` = N (N processes delivering, server.workers), this process
    keeps 1/N of each group's rate and connections, so that together they keep
    the configured pace."""

    def __init__(self, rules: tuple[ThrottleRule, ...], default_connections: int, clock: Callable[[], float] = time.monotonic,
                 share: int = 1, index: int = 0) -> None:
        self.rules = rules
        self.default_connections = default_connections
        self._clock = clock
        self.share = share
        self.index = index  # which of the `share` processes this is (its part of the connections)
        self.paces: dict[str, Pace] = {}

    def pace_for(self, mx_host: str) -> Pace:
        name, rule = group_of(mx_host, self.rules)
        if name not in self.paces:
            share, index = self.share, self.index
            if rule is None:
                self.paces[name] = Pace(name, share_of(self.default_connections, share, index), UNLIMITED, UNLIMITED,
                                        self._clock)
            else:
                self.paces[name] = Pace(name, share_of(rule.connections, share, index), rule.rate / share,
                                        rule.floor / share, self._clock)
        return self.paces[name]

    def reconfigure(self, rules: tuple[ThrottleRule, ...], default_connections: int) -> None:
        """New [[throttle]] rules or queue.per_destination (SIGHUP): groups start over with them
        (deliveries under way keep the pace they hold until they finish)."""
        self.rules = rules
        self.default_connections = default_connections
        self.paces = {}

    def deliver_alone(self) -> None:
        """This process now delivers everything: groups seen from now on get the whole pace."""
        self.share, self.index = 1, 0
        self.paces.clear()

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Each paced group's current and configured rate (messages/minute), for queue list and metrics."""
        return {
            name: {"rate": pace.rate, "max_rate": pace.max_rate, "connections": pace.connections.limit,
                   "paused_for": pace.paused_for()}
            for name, pace in sorted(self.paces.items())
            if pace.max_rate != UNLIMITED
        }


def share_of(total: int, share: int, index: int) -> int:
    """Process `index`'s part of `total` split over `share` processes: the parts add up to
    `total` (the first `total % share` take one more), and none is below 1."""
    return max(1, total // share + (1 if index < total % share else 0))


def merge_snapshots(snapshots: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The paces of several processes added up, group by group: what the destination sees."""
    merged: dict[str, dict[str, float]] = {}
    for snapshot in snapshots:
        for name, values in snapshot.items():
            total = merged.setdefault(name, {key: 0.0 for key in values})
            for key, value in values.items():
                # A pause is the same pause in every process (each saw the block): the longest counts.
                total[key] = max(total.get(key, 0.0), value) if key == "paused_for" else total.get(key, 0.0) + value
    return dict(sorted(merged.items()))


def is_slow_down_signal(code: int | None, status: str, connection_refused: bool = False) -> bool:
    """421 anywhere, a 4.7.x deferral, or a refused connection: the receiver wants less."""
    return connection_refused or code == 421 or (status.startswith("4.7.") and (code is None or 400 <= code < 500))
