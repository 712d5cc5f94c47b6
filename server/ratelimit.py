"""Per-key token-bucket rate limiting: in-process (`RateLimiter`, the embedded store) or shared by every
replica on one Redis (`RedisRateLimiter`: one atomic Lua token bucket per key, so N replicas enforce one
budget, not N).

Redis errors fail over to the local bucket (neither open nor closed): while Redis does not answer, each
replica limits on its own, as the embedded store does, and it goes back to the shared bucket by itself
once Redis answers. A Redis outage never turns a request into a 500 nor lets a caller go unlimited.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from redis import Redis, RedisCluster
from redis.exceptions import NoScriptError, RedisError

from server.settings import Settings
from state_store.redis_scripts import Script

log = logging.getLogger(__name__)


class RateLimiter:
    """`rate` requests per second with bursts of `burst`; rate 0 disables it."""

    shared = False  # True where every replica spends from one bucket per key

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
        tokens = self._refilled(key, now)
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
        tokens = self._refilled(key, self.clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _refilled(self, key: str, now: float) -> float:
        """The tokens in `key`'s bucket at `now` (a new key's bucket is full)."""
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - last) * self.rate)

    def close(self) -> None:
        """Release what the limiter holds (nothing in process)."""

    @staticmethod
    def retry_after(seconds: float) -> str:
        return str(max(1, math.ceil(seconds)))


# KEYS: the bucket. ARGV: rate (tokens/s), burst, ttl_ms. Redis's own clock (TIME), so the replicas'
# clocks do not matter. Returns {wait seconds, tokens left} as strings (Lua numbers would be truncated).
TAKE = Script(
    "ratelimit_take",
    """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate) end
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 't', string.format('%.9f', tokens), 'ts', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {string.format('%.6f', wait), string.format('%.6f', tokens)}
""",
)


class RedisRateLimiter(RateLimiter):
    """One token bucket per key in Redis (standalone or Cluster: one key per script call), spent
    atomically by TAKE (EVALSHA, EVAL when Redis does not have the script yet).

    `take` runs in FastAPI's thread pool (a sync dependency), so it uses a synchronous client with
    short timeouts; `peek` (called on the event loop) answers from the bucket as this replica last saw
    it, never a round trip: it may let an upload through that `take` then refuses. Keys are
    `<prefix><sha256 of the API key>` (the keys themselves never reach Redis) and expire once full.
    """

    shared = True

    def __init__(
        self,
        rate: float,
        burst: int,
        client: Redis | RedisCluster,
        *,
        prefix: str = "retserve:ratelimit:",
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(rate, burst, clock)
        self.client = client
        self.prefix = prefix
        self.retry_s = retry_s  # after a Redis error, limit locally this long before asking again
        self._down_until = -math.inf
        self._lock = threading.Lock()
        full_s = burst / rate if rate > 0 else 0.0
        self.ttl_ms = math.ceil(full_s * 1000) + 1000

    @classmethod
    def from_url(cls, url: str, rate: float, burst: int, **kwargs: Any) -> RedisRateLimiter:
        """`redis://`, `rediss://` or `redis+cluster://` (as RETSERVE_STORE_URL)."""
        common: dict[str, Any] = dict(socket_timeout=0.5, socket_connect_timeout=0.5)
        client: Redis | RedisCluster
        if "+cluster://" in url:
            client = RedisCluster.from_url(url.replace("+cluster://", "://", 1), **common)
        else:
            client = Redis.from_url(url, retry_on_timeout=False, **common)
        return cls(rate, burst, client, **kwargs)

    def key(self, bucket: str) -> str:
        return self.prefix + hashlib.sha256(bucket.encode()).hexdigest()[:32]

    def take(self, key: str) -> float:
        if self.rate <= 0:
            return 0.0
        if self.clock() < self._down_until:
            return super().take(key)
        try:
            wait, tokens = self._take_shared(key)
        except (RedisError, OSError) as e:
            with self._lock:
                self._down_until = self.clock() + self.retry_s
            log.warning("rate limit: Redis failed (%s); limiting per replica for %.1fs", e, self.retry_s)
            return super().take(key)
        self._buckets[key] = (tokens, self.clock())  # what `peek` and a later failover start from
        return wait

    def _take_shared(self, key: str) -> tuple[float, float]:
        keys_args = (1, self.key(key), repr(float(self.rate)), str(self.burst), str(self.ttl_ms))
        try:
            res = self.client.execute_command("EVALSHA", TAKE.sha, *keys_args)
        except NoScriptError:  # first use, or Redis restarted
            res = self.client.execute_command("EVAL", TAKE.source, *keys_args)
        wait, tokens = (float(v) for v in res)
        return wait, tokens

    def close(self) -> None:
        self.client.close()


def make_limiter(settings: Settings) -> RateLimiter:
    """Shared by every replica when the store is Redis; per process with the embedded store."""
    url = settings.store_url
    if settings.rate_limit_per_s > 0 and not url.startswith("memory://"):
        return RedisRateLimiter.from_url(url, settings.rate_limit_per_s, settings.rate_limit_burst)
    return RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
