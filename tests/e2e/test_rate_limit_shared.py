"""Per-key rate limits shared across replicas on Redis (server/ratelimit.py): two real servers on one
Redis enforce one budget per API key; the Lua token bucket is atomic, refills, survives a SCRIPT FLUSH,
and a Redis outage fails over to per-process limiting (never a 500, never unlimited)."""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path

import httpx
import redis

from server.ratelimit import RateLimiter, RedisRateLimiter, make_limiter
from server.settings import Settings
from tests.e2e.test_state_redis_cluster import cluster  # noqa: F401 - the 3-primary cluster fixture
from tests.support.server import run_server
from tests.support.state import REDIS_URL, RedisServer, redis_cleanup, require_redis


def _get(url: str, key: str) -> httpx.Response:
    return httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)


def test_two_servers_on_one_redis_share_one_budget_per_key():
    require_redis()
    key_a, key_b = secrets.token_hex(16), secrets.token_hex(16)
    env = {
        "RETSERVE_STORE_URL": REDIS_URL.rstrip("/") + "/0",
        "RETSERVE_API_KEYS": json.dumps({key_a: "alice", key_b: "bob"}),
        "RETSERVE_RATE_LIMIT_PER_S": "0.01",  # one token per 100 s: no refill during the test
        "RETSERVE_RATE_LIMIT_BURST": "6",
    }
    limiter = RedisRateLimiter.from_url(REDIS_URL, 0.01, 6)
    try:
        with run_server(env) as one, run_server(env) as two:
            codes = [_get((one, two)[i % 2], key_a).status_code for i in range(10)]
            # alone, each server would allow 6 (12 in all); together they allow 6
            assert codes == [200] * 6 + [429] * 4, codes
            refused = _get(one, key_a)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert "one budget for every replica" in refused.json()["error"]["message"]
            assert int(refused.headers["Retry-After"]) >= 90  # the shared bucket's wait, not a local one
            assert _get(two, key_b).status_code == 200  # another key has its own budget
    finally:
        for k in (key_a, key_b):
            limiter.client.delete(limiter.key(k))
        limiter.close()


def test_bucket_is_atomic_refills_and_reloads_its_script():
    require_redis()
    limiter = RedisRateLimiter.from_url(REDIS_URL, 5.0, 20, prefix="retserve-test-rl:")
    key = secrets.token_hex(8)
    allowed: list[int] = []

    def spend() -> None:
        allowed.append(sum(limiter.take(key) == 0.0 for _ in range(10)))

    try:
        threads = [threading.Thread(target=spend) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # 60 takes at once from a bucket of 20 (+ at most a token or two refilled meanwhile)
        assert 20 <= sum(allowed) <= 22, allowed
        wait = limiter.take(key)
        assert 0 < wait <= 0.2 + 1e-6  # 1 token at 5/s
        time.sleep(0.45)  # two tokens refill
        limiter.client.script_flush()  # Redis restarted / failed over: EVALSHA misses, EVAL reloads
        assert limiter.take(key) == 0.0
        assert limiter.peek(key) == 0.0 or limiter.peek(key) < 0.2  # the last bucket this replica saw
        assert limiter.ttl_ms == 5000  # a full bucket (20 / 5 s) + 1 s, then the key goes
        assert 0 < limiter.client.pttl(limiter.key(key)) <= 5000
        assert key not in str(limiter.client.keys("retserve-test-rl:*"))  # API keys never reach Redis
    finally:
        redis_cleanup("retserve-test-rl:")
        limiter.close()


def test_redis_outage_fails_over_to_the_local_bucket(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start()
    limiter = RedisRateLimiter.from_url(server.url, 0.01, 3, retry_s=0.5)
    try:
        assert [limiter.take("k") for _ in range(2)] == [0.0, 0.0]
        server.kill()
        t0 = time.monotonic()
        # the local bucket goes on from what Redis last said (1 token left), without raising
        assert limiter.take("k") == 0.0
        assert limiter.take("k") > 0
        assert limiter.take("other") == 0.0  # per replica meanwhile, not closed
        assert time.monotonic() - t0 < 2.0  # one short timeout, then no Redis calls for retry_s
        server.start()  # a fresh, empty Redis (same port): after retry_s the shared bucket is back
        time.sleep(0.6)
        assert limiter.take("k") == 0.0  # a new shared bucket (burst 3)
        assert limiter.take("k") == 0.0
    finally:
        limiter.close()
        server.kill()


def test_a_server_limits_on_its_own_while_redis_is_down(tmp_path: Path):
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    key = secrets.token_hex(16)
    env = {
        "RETSERVE_STORE_URL": redis_server.url,
        "RETSERVE_API_KEYS": json.dumps({key: "alice"}),
        "RETSERVE_RATE_LIMIT_PER_S": "0.01",
        "RETSERVE_RATE_LIMIT_BURST": "3",
    }
    try:
        with run_server(env) as url:
            assert _get(url, key).status_code == 200  # shared bucket: 2 tokens left
            redis_server.kill()
            codes = [_get(url, key).status_code for _ in range(4)]
            assert codes == [200, 200, 429, 429], codes  # the local bucket goes on from the shared one
    finally:
        redis_server.kill()


def test_buckets_on_a_redis_cluster(cluster: list[RedisServer]):  # noqa: F811 - the fixture
    url = "redis+cluster://" + cluster[0].url.removeprefix("redis://").rsplit("/", 1)[0]
    limiter = RedisRateLimiter.from_url(url, 0.01, 3)
    try:
        keys = [secrets.token_hex(8) for _ in range(6)]  # spread over the three primaries' slots
        assert len({limiter.client.get_node_from_key(limiter.key(k)).port for k in keys}) > 1
        for k in keys:
            assert [limiter.take(k) == 0.0 for _ in range(4)] == [True, True, True, False]
        for node in cluster:  # every primary forgets the script: EVALSHA misses, EVAL reloads
            redis.Redis(port=node.port).script_flush()
        assert limiter.take(keys[0]) > 90 and limiter.take(secrets.token_hex(8)) == 0.0
        assert limiter.clock() >= limiter._down_until  # no failover happened: every call reached Redis
    finally:
        limiter.close()


def test_make_limiter_follows_the_store():
    assert type(make_limiter(Settings(rate_limit_per_s=1.0))) is RateLimiter  # embedded: per process
    shared = make_limiter(Settings(rate_limit_per_s=1.0, store_url="redis://127.0.0.1:1/0"))
    assert isinstance(shared, RedisRateLimiter) and shared.shared
    shared.close()
    assert type(make_limiter(Settings(store_url="redis://127.0.0.1:1/0"))) is RateLimiter  # off
