"""Per-key rate limits: a token bucket per API key (rate per second, a burst of a few
seconds' worth), kept in the memory of the process serving [http] (the main process only).
Time comes from the reactor (`clock.seconds()`), so tests run it on task.Clock."""

from __future__ import annotations

import math
from typing import Any


class TokenBuckets:
    def __init__(self, clock: Any) -> None:
        self.clock = clock
        # key name -> (tokens, at): as many as keys were used since the start (names come from the key file)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, name: str, rate: float, burst: float) -> int:
        """Spend one request of key `name`: 0 when allowed, else the whole seconds to wait
        (for Retry-After, RFC 9110 10.2.3)."""
        now = self.clock.seconds()
        tokens, at = self._buckets.get(name, (burst, now))
        tokens = min(burst, tokens + max(0.0, now - at) * rate)
        if tokens >= 1.0:
            self._buckets[name] = (tokens - 1.0, now)
            return 0
        self._buckets[name] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / rate))
