"""Session leases over HTTP with a real Redis: they survive neither a Redis crash nor a dead server.

- Redis killed (-9) while 16 session streams run, restarted from its AOF (lease keys included): every
  session answers again within 5 s of Redis being back (the server releases the leases it still holds
  once the store answers), and every state saved before the crash is intact.
- A server killed (-9) mid-stream: its lease expires within seconds (short TTL, renewed while held).
- Concurrent generates on primed sessions all succeed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram
from pydantic import ValidationError

from server.session_service import SessionService
from server.settings import Settings
from state_store import LockHeldError, RedisStateStore, SessionStates
from tests.support.server import run_server
from tests.support.state import RedisServer, run, tiny_codec

N_STREAMS = 16
# a stream that runs until its client leaves (the small model writes thousands of tokens a second)
LONG = {"prompt": " And", "max_tokens": 10**6, "ignore_eos": True, "temperature": 0, "stream": True}
LONG_OK = {"RETSERVE_MAX_TOKENS_LIMIT": str(10**6)}


def _stream_until(url: str, sid: str, started: threading.Semaphore, stop: threading.Event) -> int:
    """Stream a long generation on `sid` until `stop`; then close the connection (the request aborts)."""
    chunks = 0
    with (
        httpx.Client(base_url=url, timeout=60) as c,
        c.stream("POST", f"/v1/sessions/{sid}/generate", json=LONG) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
                if chunks == 1:
                    started.release()
            if stop.is_set():
                break
    return chunks


def _wait_usable(c: httpx.Client, sid: str, deadline: float) -> httpx.Response:
    """Export `sid`'s state, retrying while its lease is held (409) until `deadline`."""
    while True:
        r = c.get(f"/v1/sessions/{sid}/state")
        if r.status_code != 409 or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_sessions_usable_soon_after_redis_crash_and_aof_restart(tmp_path):
    """The lease TTL is long here (30 s): only the server releasing its leases when Redis is back can
    free the sessions within 5 s (with the default few-second TTL they would also expire soon)."""
    redis_srv = RedisServer(tmp_path, extra=["--appendonly", "yes", "--appendfsync", "always"])
    redis_srv.start()
    env = {
        **LONG_OK,
        "RETSERVE_STORE_URL": redis_srv.url,
        "RETSERVE_SESSION_LOCK_TTL_S": "30",
    }
    streamed = [f"crash-{i}" for i in range(N_STREAMS)]
    idle = [f"idle-{i}" for i in range(4)]
    try:
        with run_server(env) as url, httpx.Client(base_url=url, timeout=30) as c:
            for sid in streamed + idle:
                r = c.post("/v1/sessions", json={"session_id": sid, "prompt": f"Session {sid} begins."})
                assert r.status_code == 201, r.text
            before = {sid: c.get(f"/v1/sessions/{sid}/state").content for sid in streamed + idle}

            started, stop = threading.Semaphore(0), threading.Event()
            with ThreadPoolExecutor(N_STREAMS) as pool:
                futs = [pool.submit(_stream_until, url, sid, started, stop) for sid in streamed]
                for _ in streamed:
                    assert started.acquire(timeout=60), "a stream did not start"
                redis_srv.kill()  # SIGKILL, mid-stream: the lease keys stay in the AOF
                time.sleep(1.0)
                stop.set()  # the clients leave: aborted, saves and releases fail while Redis is down
                assert all(f.result(timeout=60) > 0 for f in futs)
            assert c.post("/v1/sessions/crash-0/generate", json={"prompt": "x"}).status_code == 503
            deadline = time.monotonic() + 15
            while f"retserve:session_leases_unreleased {N_STREAMS}.0" not in c.get("/metrics").text:
                assert time.monotonic() < deadline, "the failed releases were not queued"
                time.sleep(0.1)

            redis_srv.start()  # same port and directory: loads the AOF, answers PING when it returns
            back = time.monotonic()
            deadline = back + 5.0
            for sid in streamed + idle:
                r = _wait_usable(c, sid, deadline)
                assert r.status_code == 200, (sid, r.status_code, r.text[:300])
                assert r.content == before[sid], f"session {sid} changed across the crash"
            for sid in streamed:
                r = c.post(f"/v1/sessions/{sid}/generate", json={"prompt": " Then", "max_tokens": 2})
                assert r.status_code == 200, (sid, r.text)
            took = time.monotonic() - back
            assert took < 5.0, f"sessions were usable only {took:.1f}s after Redis came back"
            assert "retserve:session_leases_unreleased 0.0" in c.get("/metrics").text
    finally:
        redis_srv.kill()


def test_a_dead_servers_leases_expire_within_seconds(tmp_path):
    """Two servers on one Redis; one is killed (-9) mid-stream: the other can use the session within
    the lease TTL (default 5 s), not after a minute."""
    redis_srv = RedisServer(tmp_path)
    redis_srv.start()
    env = {**LONG_OK, "RETSERVE_STORE_URL": redis_srv.url}
    try:
        with (
            run_server(env) as url_a,
            run_server(env) as url_b,
            httpx.Client(base_url=url_b, timeout=30) as b,
        ):
            r = b.post("/v1/sessions", json={"session_id": "orphan", "prompt": "A story about"})
            assert r.status_code == 201, r.text
            with (
                httpx.Client(base_url=url_a, timeout=30) as a,
                a.stream("POST", "/v1/sessions/orphan/generate", json=LONG) as resp,
            ):
                assert resp.status_code == 200
                lines = resp.iter_lines()  # kept: a closed iterator would close the stream
                next(ln for ln in lines if ln.startswith("data: {"))
                time.sleep(2.0)  # past one renewal
                url_a.proc.kill()
                killed = time.monotonic()
            r = b.post("/v1/sessions/orphan/generate", json={"prompt": " x", "max_tokens": 1})
            assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy", r.text
            while (
                r := b.post("/v1/sessions/orphan/generate", json={"prompt": " x", "max_tokens": 1})
            ).status_code == 409:
                assert time.monotonic() - killed < 8.0, "the dead server's lease did not expire"
                time.sleep(0.1)
            assert r.status_code == 200, r.text
    finally:
        redis_srv.kill()


def test_concurrent_generates_on_primed_sessions():
    """8 sessions primed with "Hi", then 8 concurrent generates: all 200 (a batch of rows resumed from
    stored states of the same length)."""
    with run_server() as url, httpx.Client(base_url=url, timeout=60) as c:
        sids = [f"hi-{i}" for i in range(8)]
        for sid in sids:
            r = c.post("/v1/sessions", json={"session_id": sid, "prompt": "Hi"})
            assert r.status_code == 201, r.text

        def go(sid: str) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=60) as own:
                return own.post(f"/v1/sessions/{sid}/generate", json={"prompt": " go on", "max_tokens": 20})

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(go, sids))
        bad = [
            (sid, r.status_code, r.text[:200])
            for sid, r in zip(sids, results, strict=True)
            if r.status_code != 200
        ]
        assert not bad, bad
        assert all(r.json()["usage"]["prompt_tokens"] > 0 for r in results)


def _service(redis_srv: RedisServer, ttl: float) -> SessionService:
    store = RedisStateStore.from_url(
        redis_srv.url, socket_timeout=0.5, connect_timeout=0.5, op_timeout=1.0, retries=1, backoff_cap=0.05
    )
    settings = Settings(session_lock_ttl_s=ttl)
    return SessionService(
        SessionStates(store, tiny_codec()), settings, Histogram("b", "b", registry=CollectorRegistry())
    )


def test_a_release_that_failed_is_retried_when_redis_is_back(tmp_path):
    """The service level of the crash test: the lease key survives in the AOF; the queued release
    frees it within a second of Redis answering, far before its 30 s TTL."""
    redis_srv = RedisServer(tmp_path, extra=["--appendonly", "yes", "--appendfsync", "always"])
    redis_srv.start()

    async def main() -> None:
        svc = _service(redis_srv, ttl=30.0)
        async with svc.lease("t", "s1"):
            redis_srv.kill()
        assert len(svc.pending) == 1  # the release failed: queued
        assert await svc.flush_releases() == 1  # still down: stays queued
        await asyncio.to_thread(redis_srv.start)
        with pytest.raises(LockHeldError):  # the lease key came back from the AOF
            await svc.store.acquire("t", "s1", 1.0)
        back = time.monotonic()
        retries = asyncio.get_running_loop().create_task(svc.retry_releases())
        while svc.pending:
            assert time.monotonic() - back < 2.0, "the queued release was not retried"
            await asyncio.sleep(0.02)
        lease = await svc.store.acquire("t", "s1", 1.0)  # free now
        await svc.store.release(lease)
        retries.cancel()
        await svc.store.close()

    try:
        run(main())
    finally:
        redis_srv.kill()


def test_a_queued_release_is_dropped_once_its_lease_expired(tmp_path):
    redis_srv = RedisServer(tmp_path)
    redis_srv.start()

    async def main() -> None:
        svc = _service(redis_srv, ttl=0.3)
        async with svc.lease("t", "s1"):
            redis_srv.kill()
        assert len(svc.pending) == 1
        await asyncio.sleep(0.4)
        assert await svc.flush_releases() == 0  # expired in the store by itself: nothing to retry
        await svc.store.close()

    try:
        run(main())
    finally:
        redis_srv.kill()


def test_lease_renewal_must_be_shorter_than_the_ttl():
    with pytest.raises(ValidationError, match="session_lock_renew_s"):
        Settings(session_lock_ttl_s=2.0, session_lock_renew_s=2.0)
    assert Settings(session_lock_ttl_s=2.0, session_lock_renew_s=0.5).lease_renew_interval_s == 0.5
    assert Settings(session_lock_ttl_s=3.0).lease_renew_interval_s == 1.0  # default: a third of the TTL
    assert Settings().lease_renew_interval_s < Settings().session_lock_ttl_s <= 10  # short by default
