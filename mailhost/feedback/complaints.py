"""The spam-complaint rate per mailbox provider: complaints / delivered over a sliding window.

Gmail asks bulk senders to stay under 0.1% and refuses them above 0.3%; Yahoo the same.
Deliveries and complaints are counted per provider (the recipient's domain mapped by
`provider_of`) in hour buckets; the rate is the sum over the last 24 of them.

Every process of the daemon counts in memory (`delivered` on the reactor thread, cheap) and
adds its counts to one small file, `state_dir/complaints.json`, every FLUSH_SECONDS and at
once after a complaint (`flush`, blocking: the daemon's threads), a read-modify-write
under an exclusive flock on `complaints.json.lock`. So with `[server] workers` the rate is
over the deliveries of every process and the complaints whichever process took the report,
and the last level logged per provider is kept in the file too: each crossing of a
threshold is logged once, by the process that crossed it, not once per process.

A rate is judged only over MIN_DELIVERED deliveries or more in the window: below that one
complaint says little (1 of 3 is not a 33% problem), and 1000 is where a single complaint
is Gmail's 0.1%.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from mailhost.ops.durable import write_file_atomically
from mailhost.ops.ownership import Owner
from mailhost.ops.statelock import exclusive

log = Logger(namespace="mailhost.complaints")

FILE_NAME = "complaints.json"
BUCKET_SECONDS = 3600
WINDOW_SECONDS = 24 * 3600
FLUSH_SECONDS = 5.0
WARNING_RATE = 0.001  # Gmail's and Yahoo's "stay under 0.1%"
ERROR_RATE = 0.003  # where they start refusing bulk mail
MIN_DELIVERED = 1000  # deliveries in the window before a rate is judged (see the module docstring)
LEVELS = ("", "warning", "error")

# Domains of the big providers, by the name the metric carries; any other domain is its own provider.
_PROVIDERS = {
    "google": ("gmail.com", "googlemail.com"),
    "yahoo": ("yahoo.com", "aol.com", "ymail.com", "rocketmail.com", "aim.com"),
    "microsoft": ("outlook.com", "hotmail.com", "live.com", "msn.com", "passport.com"),
    "apple": ("icloud.com", "me.com", "mac.com"),
}
_BY_DOMAIN = {domain: name for name, domains in _PROVIDERS.items() for domain in domains}
# Country variants: yahoo.co.uk, hotmail.fr, outlook.de, live.co.uk ...
_COUNTRY = re.compile(r"^(?:co\.|com\.)?[a-z]{2}$")
_BY_LABEL = {"yahoo": "yahoo", "hotmail": "microsoft", "outlook": "microsoft", "live": "microsoft"}


def provider_of(address: str) -> str:
    """The provider of a recipient address (or a domain): google, yahoo, microsoft, apple,
    else the domain itself, lower case."""
    domain = address.rpartition("@")[2].strip().rstrip(".>").lower()
    if domain in _BY_DOMAIN:
        return _BY_DOMAIN[domain]
    label, _, rest = domain.partition(".")
    if label in _BY_LABEL and _COUNTRY.match(rest):
        return _BY_LABEL[label]
    return domain or "unknown"


def level_of(rate: float) -> str:
    return "error" if rate > ERROR_RATE else "warning" if rate > WARNING_RATE else ""


@dataclass(frozen=True)
class ProviderRate:
    provider: str
    delivered: int  # in the window
    complaints: int  # in the window
    total_complaints: int  # ever (the counter)

    @property
    def rate(self) -> float:
        return self.complaints / self.delivered if self.delivered else 0.0


class ComplaintRate:
    """This process's counts, and the shared figures in `path` (see the module docstring)."""

    def __init__(self, path: Path, owner: Owner | None = None, clock: Callable[[], float] = time.time,
                 min_delivered: int = MIN_DELIVERED) -> None:
        self.path = Path(path)
        self.owner = owner
        self.clock = clock
        self.min_delivered = min_delivered
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._mutex = threading.Lock()  # the pending counts (reactor thread and flushing thread)
        self._flushing = threading.Lock()  # one read-modify-write at a time within the process
        self._pending: dict[tuple[int, str], list[int]] = {}  # (bucket, provider) -> [delivered, complaints]
        self._cache: tuple[Any, dict[str, Any]] | None = None  # (file identity, its figures)

    # -- counting (cheap; any thread)

    def delivered(self, recipient: str) -> None:
        self._count(recipient, 0)

    def complained(self, recipient: str) -> None:
        self._count(recipient, 1)

    def _count(self, recipient: str, which: int) -> None:
        key = (self._bucket(self.clock()), provider_of(recipient))
        with self._mutex:
            self._pending.setdefault(key, [0, 0])[which] += 1

    def _bucket(self, now: float) -> int:
        return int(now // BUCKET_SECONDS) * BUCKET_SECONDS

    # -- the shared figures (blocking)

    def flush(self) -> list[tuple[str, str, ProviderRate]]:
        """Add this process's counts to the file; log each provider whose level changed and
        return those changes as (provider, new level, its figures)."""
        with self._mutex:
            pending, self._pending = self._pending, {}
        if not pending:
            return []
        with self._flushing, exclusive(self._lock_path, self.owner):
            data = self._read()
            now = self.clock()
            buckets = data["buckets"]
            for (bucket, provider), (delivered, complaints) in pending.items():
                counts = buckets.setdefault(str(bucket), {}).setdefault(provider, [0, 0])
                counts[0] += delivered
                counts[1] += complaints
                if complaints:
                    data["totals"][provider] = data["totals"].get(provider, 0) + complaints
            data["buckets"] = {b: c for b, c in buckets.items() if int(b) > now - WINDOW_SECONDS - BUCKET_SECONDS}
            changes = self._judge(data, now, {provider for _, provider in pending})
            encoded = json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")
            write_file_atomically(self.path, encoded + b"\n", 0o600, self.owner)
        for provider, level, figures in changes:
            _tell(provider, level, figures)
        return changes

    def rates(self) -> dict[str, ProviderRate]:
        """Each provider's figures over the window: the file's plus this process's counts not
        yet flushed (for /metrics, at scrape time)."""
        data = self._cached()
        with self._mutex:
            pending = dict(self._pending)
        now = self.clock()
        window: dict[str, list[int]] = {}
        totals = dict(data["totals"])
        for bucket, counts in data["buckets"].items():
            if int(bucket) > now - WINDOW_SECONDS:
                for provider, (delivered, complaints) in counts.items():
                    into = window.setdefault(provider, [0, 0])
                    into[0] += delivered
                    into[1] += complaints
        for (_, provider), (delivered, complaints) in pending.items():
            into = window.setdefault(provider, [0, 0])
            into[0] += delivered
            into[1] += complaints
            totals[provider] = totals.get(provider, 0) + complaints
        return {p: ProviderRate(p, d, c, totals.get(p, 0)) for p, (d, c) in sorted(window.items())}

    def _judge(self, data: dict[str, Any], now: float, providers: set[str]) -> list[tuple[str, str, ProviderRate]]:
        sums: dict[str, list[int]] = {}
        for bucket, counts in data["buckets"].items():
            if int(bucket) > now - WINDOW_SECONDS:
                for provider, (delivered, complaints) in counts.items():
                    into = sums.setdefault(provider, [0, 0])
                    into[0] += delivered
                    into[1] += complaints
        changes = []
        alarms = data["alarms"]
        for provider in sorted(providers | set(alarms)):
            delivered, complaints = sums.get(provider, [0, 0])
            figures = ProviderRate(provider, delivered, complaints, data["totals"].get(provider, 0))
            if delivered < self.min_delivered:
                continue  # too few to judge: the level logged last stands
            level = level_of(figures.rate)
            if level != alarms.get(provider, ""):
                changes.append((provider, level, figures))
                if level:
                    alarms[provider] = level
                else:
                    alarms.pop(provider, None)
        return changes

    def _read(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError) as error:
            log.warn("{path}: unreadable ({error}); complaint figures start again", path=str(self.path), error=error)
            raw = {}
        return _valid(raw)

    def _cached(self) -> dict[str, Any]:
        try:
            st = os.stat(self.path)
        except OSError:
            return _valid({})
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._cache is None or self._cache[0] != identity:
            self._cache = (identity, self._read())
        return self._cache[1]


def _valid(raw: Any) -> dict[str, Any]:
    """The file's figures with every part of the expected shape (a damaged part is dropped)."""
    raw = raw if isinstance(raw, dict) else {}
    buckets = {}
    for bucket, counts in (raw.get("buckets") or {}).items() if isinstance(raw.get("buckets"), dict) else ():
        if str(bucket).isdigit() and isinstance(counts, dict):
            buckets[str(bucket)] = {str(p): [int(c[0]), int(c[1])] for p, c in counts.items()
                                    if isinstance(c, list) and len(c) == 2 and all(isinstance(n, int) for n in c)}
    totals = raw.get("totals") if isinstance(raw.get("totals"), dict) else {}
    alarms = raw.get("alarms") if isinstance(raw.get("alarms"), dict) else {}
    return {"version": 1, "buckets": buckets,
            "totals": {str(p): n for p, n in totals.items() if isinstance(n, int)},
            "alarms": {str(p): a for p, a in alarms.items() if a in LEVELS[1:]}}


def _tell(provider: str, level: str, figures: ProviderRate) -> None:
    text = (f"{figures.complaints} complaints / {figures.delivered} delivered in "
            f"{WINDOW_SECONDS // 3600}h = {figures.rate:.2%}")
    if level == "error":
        log.error("complaint rate of {provider} above {limit:.1%}: {text}; providers refuse bulk mail at this rate",
                  provider=provider, limit=ERROR_RATE, text=text)
    elif level == "warning":
        log.warn("complaint rate of {provider} above {limit:.1%}: {text}", provider=provider, limit=WARNING_RATE,
                 text=text)
    else:
        log.info("complaint rate of {provider} back under {limit:.1%}: {text}", provider=provider, limit=WARNING_RATE,
                 text=text)


def complaint_rate(state_dir: Path, owner: Owner | None = None) -> ComplaintRate:
    """The daemon's shared figures: state_dir/complaints.json."""
    return ComplaintRate(Path(state_dir) / FILE_NAME, owner=owner)
