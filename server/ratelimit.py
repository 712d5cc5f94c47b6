"""Per-key token-bucket rate limiting (in-process; each server process limits on its own)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RateLimiter:
    """`rate` requests per second with bursts of `burst`; rate 0 disables it."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)

    def take(self, key: str) -> float:
        """Spend one token: 0.0 if allowed, else the seconds until the next token (for Retry-After)."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def peek(self, key: str) -> float:
        """Like `take` without spending: 0.0 if a request would be allowed now, else the seconds to wait
        (the request guard refuses a limited caller's upload before reading its body)."""
        if self.rate <= 0:
            return 0.0
        tokens, last = self._buckets.get(key, (float(self.burst), self.clock()))
        tokens = min(float(self.burst), tokens + (self.clock() - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(seconds: float) -> str:
        return str(max(1, math.ceil(seconds)))
