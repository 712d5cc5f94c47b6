"""Fault tests against a redis-server this test starts on a free port (and kills in teardown).

Killed or stalled mid-operation -> StoreUnavailable within the configured bound (no hang);
restarted -> the same store object works again, scripts included (Redis forgot them: NOSCRIPT path).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.state import RetentionState
from state_store import LockHeldError, RedisStateStore, StateCodec, StoreUnavailable, config_fingerprint
from tests.support.state import RedisServer, big_config, run, tiny_blob

SOCKET_TIMEOUT = 0.5
CONNECT_TIMEOUT = 0.5
OP_TIMEOUT = 1.0
RETRIES = 2
BACKOFF_CAP = 0.1
# Worst case: every attempt runs into the per-attempt timeout, plus the backoff sleeps between them.
BOUND = (RETRIES + 1) * OP_TIMEOUT + RETRIES * BACKOFF_CAP
SLACK = 1.5  # scheduling on a loaded 2-core machine


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.kill()


def _store(server: RedisServer) -> RedisStateStore:
    return RedisStateStore.from_url(
        server.url,
        socket_timeout=SOCKET_TIMEOUT,
        connect_timeout=CONNECT_TIMEOUT,
        op_timeout=OP_TIMEOUT,
        retries=RETRIES,
        backoff_cap=BACKOFF_CAP,
        chunk_bytes=256 * 1024,
    )


def _big_blob() -> bytes:
    """A 4 MiB state (16 chunks of 256 KiB), so operations take a while and can be hit mid-way."""
    cfg = big_config()
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(cfg.state_shape(1), generator=g) for _ in range(cfg.num_hidden_layers)]
    return StateCodec(cfg, config_fingerprint(cfg)).encode(RetentionState(layers, torch.tensor([5]), cfg))


async def _churn_until_fault(store: RedisStateStore, blob: bytes, fault, counter: list[int]) -> float:
    """Put/get `blob` in a loop; inject `fault` after two rounds; seconds until StoreUnavailable."""

    async def churn() -> None:
        while True:
            await store.put("ns", "s", blob)
            got = await store.get("ns", "s")
            assert got is not None and got.data == blob
            counter[0] += 1

    task = asyncio.create_task(churn())
    deadline = time.monotonic() + 60
    while counter[0] < 2:
        assert time.monotonic() < deadline and not task.done(), "the churn never got going"
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.003)  # land inside an operation, not between two
    fault()
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unavailable"):
        await asyncio.wait_for(task, BOUND + 30)
    return time.monotonic() - t0


async def _works(store: RedisStateStore) -> None:
    blob = tiny_blob()
    assert await store.put("ns", "after", blob) >= 1
    got = await store.get("ns", "after")
    assert got is not None and got.data == blob
    lease = await store.acquire("ns", "after", ttl=5)
    with pytest.raises(LockHeldError):
        await store.acquire("ns", "after", ttl=5)
    assert await store.release(lease)


def test_killed_mid_operation_then_restarted(server: RedisServer) -> None:
    blob = _big_blob()

    async def body() -> None:
        store = _store(server)
        await _works(store)  # scripts are cached in this server now
        counter = [0]
        elapsed = await _churn_until_fault(store, blob, server.kill, counter)
        assert elapsed < BOUND + SLACK, f"StoreUnavailable took {elapsed:.2f}s, bound {BOUND:.2f}s"
        # While it is down every operation fails fast with the typed error.
        for op in (
            store.get("ns", "s"),
            store.exists("ns", "s"),
            store.acquire("ns", "s", 5),
            store.list("ns"),
        ):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await op
            assert time.monotonic() - t0 < BOUND + SLACK
        server.start()  # same port, empty (no persistence), no cached scripts
        await _works(store)  # the same store object, no reconnect call
        await store.put("ns", "s", blob)
        got = await store.get("ns", "s")
        assert got is not None and got.data == blob
        assert store.metrics.count("redis", "get", "unavailable") >= 1
        await store.close()

    run(body())


def test_stalled_server_times_out_then_recovers(server: RedisServer) -> None:
    blob = _big_blob()

    async def body() -> None:
        store = _store(server)
        counter = [0]
        elapsed = await _churn_until_fault(
            store, blob, server.pause, counter
        )  # SIGSTOP: accepts, never answers
        assert elapsed < BOUND + SLACK, f"StoreUnavailable took {elapsed:.2f}s, bound {BOUND:.2f}s"
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get("ns", "s")
        # it did wait: every attempt ran into its socket timeout (attempts x 0.5 s, less clock slack)
        assert (RETRIES + 1) * SOCKET_TIMEOUT * 0.9 < time.monotonic() - t0 < BOUND + SLACK
        server.resume()
        await _works(store)
        await store.put("ns", "s", blob)
        got = await store.get("ns", "s")
        assert got is not None and got.data == blob
        await store.close()

    run(body())


def test_started_while_redis_is_down(tmp_path: Path) -> None:
    """A store made before Redis is up fails cleanly, then works once Redis starts."""
    server = RedisServer(tmp_path)

    async def body() -> None:
        store = _store(server)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        server.start()
        await store.ping()
        await _works(store)
        await store.close()

    try:
        run(body())
    finally:
        server.kill()
