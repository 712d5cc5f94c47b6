"""Redis-only behaviour against the real Redis at REDIS_URL: chunked values (up to a 2.7B-preset
state), no leaked keys, TTLs on every chunk, and a typed error when nothing listens."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
import torch
from redis.utils import HIREDIS_AVAILABLE

from model.config import preset
from model.state import RetentionState
from state_store import (
    RedisStateStore,
    StateCodec,
    StoreUnavailable,
    VersionConflictError,
    config_fingerprint,
)
from state_store.keys import SessionKeys, session_keys
from tests.support.state import (
    REDIS_URL,
    free_port,
    new_prefix,
    redis_cleanup,
    redis_keys,
    require_redis,
    run,
    tiny_blob,
)


@pytest.fixture
def prefix() -> Iterator[str]:
    require_redis()
    p = new_prefix()
    yield p
    redis_cleanup(p)


def _pttl(key: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return int(client.pttl(key))
    finally:
        client.close()


def test_values_are_chunked_and_old_generations_removed(prefix: str) -> None:
    blob = tiny_blob()
    k = session_keys(prefix, "ns", "s")

    async def body() -> None:
        async with RedisStateStore.from_url(REDIS_URL, prefix=prefix, chunk_bytes=1000) as store:
            await store.put("ns", "s", blob)
            keys = redis_keys(prefix)
            assert len(keys) == 1 + -(-len(blob) // 1000)  # meta + ceil(size / chunk) chunks
            got = await store.get("ns", "s")
            assert got is not None and got.data == blob
            small = RedisStateStore.from_url(REDIS_URL, prefix=prefix, chunk_bytes=len(blob))
            await small.put("ns", "s", blob)  # one chunk now; the 18 old ones must be gone
            assert sorted(redis_keys(prefix)) == sorted([k.meta.encode(), *(c.encode() for c in _chunks(k))])
            with pytest.raises(VersionConflictError):
                await store.put("ns", "s", blob, expected_version=1)  # its uploaded chunks are discarded
            assert len(redis_keys(prefix)) == 2
            await small.close()
            assert await store.delete("ns", "s")
            assert redis_keys(prefix) == []

    run(body())


def _chunks(k: SessionKeys) -> list[str]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        gen = client.hget(k.meta, "g").decode()
        n = int(client.hget(k.meta, "n"))
    finally:
        client.close()
    return k.chunks(gen, n)


def test_ttl_covers_every_chunk(prefix: str) -> None:
    k = session_keys(prefix, "ns", "ttl")

    async def body() -> None:
        async with RedisStateStore.from_url(
            REDIS_URL, prefix=prefix, chunk_bytes=4096, chunk_grace=5
        ) as store:
            await store.put("ns", "ttl", tiny_blob(), ttl=60)
            meta_ttl = _pttl(k.meta)
            assert 55_000 < meta_ttl <= 60_000
            for c in _chunks(k):
                assert meta_ttl < _pttl(c) <= 65_000  # chunks outlive the meta by the grace period
            assert await store.touch("ns", "ttl", None)
            assert _pttl(k.meta) == -1 and all(_pttl(c) == -1 for c in _chunks(k))
            assert await store.touch("ns", "ttl", 1)
            assert all(0 < _pttl(c) <= 6000 for c in [k.meta, *_chunks(k)])

    run(body())


def test_largest_real_state_roundtrips_through_redis(prefix: str) -> None:
    """A one-row state of the 2.7B preset (32 x 10 x 256 x 512 fp32 = 168 MB) in 32 MiB chunks."""
    config = preset("2.7B")
    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(config.state_shape(1), generator=gen) for _ in range(config.num_hidden_layers)]
    state = RetentionState(layers, torch.tensor([123_456]), config)
    codec = StateCodec(config, config_fingerprint(config))
    data = codec.encode(state)
    assert len(data) > 160 * 2**20

    async def body() -> float:
        async with RedisStateStore.from_url(REDIS_URL, prefix=prefix) as store:
            t0 = time.perf_counter()
            await store.put("big", "s", data)
            got = await store.get("big", "s")
            dt = time.perf_counter() - t0
            assert got is not None and got.info.size == len(data)
            assert codec.decode(got.data).state.equal(state)
            assert len(redis_keys(prefix)) == 1 + -(-len(data) // (32 * 2**20))
            return dt

    print(f"2.7B state {len(data) / 2**20:.0f} MiB: put+get {run(body()):.2f} s")


def test_nothing_listening_is_store_unavailable_quickly() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"

    async def body() -> None:
        store = RedisStateStore.from_url(url, connect_timeout=0.5, retries=2, backoff_cap=0.1)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{url.split(':')[2]}"):
            await store.get("ns", "s")
        with pytest.raises(StoreUnavailable, match="3 attempts"):
            await store.put("ns", "s", tiny_blob())
        with pytest.raises(StoreUnavailable):
            await store.acquire("ns", "s", 5)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert time.monotonic() - t0 < 5
        assert store.metrics.count("redis", "get", "unavailable") == 1
        await store.close()

    run(body())


def test_client_configuration() -> None:
    store = RedisStateStore.from_url("redis://user:secret@127.0.0.1:1/0", socket_timeout=1.5)
    assert "secret" not in store.description and "127.0.0.1:1" in store.description
    assert HIREDIS_AVAILABLE  # redis-py parses replies with hiredis
    kwargs = store._pool.connection_kwargs
    assert kwargs["retry"].get_retries() == 0  # no hidden retries under the store's own bounded ones
    assert kwargs["socket_timeout"] == 1.5
    run(store.close())
