"""What only the embedded store has: the byte budget with LRU eviction and an injectable clock;
plus the typed SessionStates layer and the prometheus exposition of the metrics (on the memory store)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from state_store import (
    MemoryStateStore,
    ModelMismatchError,
    SessionStates,
    StateCodec,
    StoreMetrics,
    StoreMetricsCollector,
    ValueTooLargeError,
    config_fingerprint,
)
from tests.support.state import run, tiny_blob, tiny_codec, tiny_model, tiny_state

SIZE = len(tiny_blob())


def test_lru_evicts_least_recently_used_within_the_byte_budget() -> None:
    # Encoded sizes vary by a few bytes with the creation time in the header: use fixed blobs.
    blob, other = tiny_blob(), tiny_blob(1)
    size = len(blob)

    async def body() -> None:
        store = MemoryStateStore(max_bytes=3 * size + 10)
        for sid in ("a", "b", "c"):
            await store.put("ns", sid, blob)
        assert store.used_bytes == 3 * size and store.evictions == 0
        assert await store.get("ns", "a") is not None  # a is now the most recent
        await store.put("ns", "d", blob)  # over budget: b (least recent) goes
        assert store.evictions == 1 and store.used_bytes == 3 * size
        assert [await store.exists("ns", s) for s in "abcd"] == [True, False, True, True]
        await store.put("ns", "c", other)  # an overwrite replaces the old value's bytes
        assert store.evictions == 1 and store.used_bytes == 2 * size + len(other)
        await store.delete("ns", "a")
        assert store.used_bytes == size + len(other)

    run(body())


def test_value_larger_than_the_budget_is_refused() -> None:
    async def body() -> None:
        store = MemoryStateStore(max_bytes=SIZE - 1)
        with pytest.raises(ValueTooLargeError, match="max_value_bytes"):
            await store.put("ns", "big", tiny_blob())
        assert store.used_bytes == 0

    run(body())


def test_ttl_and_leases_follow_the_clock() -> None:
    now = [1000.0]
    store = MemoryStateStore(clock=lambda: now[0])

    async def body() -> None:
        await store.put("ns", "s", tiny_blob(), ttl=10)
        lease = await store.acquire("ns", "s", ttl=5)
        now[0] += 6  # lease expired, value not yet
        assert await store.exists("ns", "s")
        other = await store.acquire("ns", "s", ttl=5)
        assert other.token != lease.token
        now[0] += 5  # value expired
        assert await store.get("ns", "s") is None and store.used_bytes == 0

    run(body())


def test_session_states_save_and_load() -> None:
    async def body() -> None:
        store = MemoryStateStore()
        sessions = SessionStates(store, tiny_codec())
        s = tiny_state(batch=2)
        assert await sessions.save("ns", "chat", s, ttl=60) == 1
        loaded = await sessions.load("ns", "chat")
        assert loaded is not None and loaded.state.equal(s) and loaded.info.version == 1
        assert (
            await sessions.save("ns", "chat", s, created_at=loaded.meta.created_at, expected_version=1) == 2
        )
        info = await sessions.info("ns", "chat")
        assert info is not None and info.meta.created_at == loaded.meta.created_at
        assert await sessions.load("ns", "none") is None
        other = SessionStates(store, StateCodec(tiny_model().config, config_fingerprint(tiny_model().config)))
        with pytest.raises(ModelMismatchError):
            await other.load("ns", "chat")

    run(body())


def test_metrics_export_through_prometheus_client() -> None:
    metrics = StoreMetrics()

    async def body() -> None:
        store = MemoryStateStore(metrics=metrics)
        await store.put("ns", "s", tiny_blob())
        await store.get("ns", "s")
        await store.get("ns", "absent")

    run(body())
    registry = CollectorRegistry()
    registry.register(StoreMetricsCollector(metrics))
    text = generate_latest(registry).decode()
    assert 'retserve_state_store_operations_total{backend="memory",op="get",outcome="miss"} 1.0' in text
    assert 'retserve_state_store_operations_total{backend="memory",op="put",outcome="ok"} 1.0' in text
    assert (
        f'retserve_state_store_bytes_total{{backend="memory",direction="written",op="put"}} {SIZE}.0' in text
    )
    assert 'retserve_state_store_operation_seconds_count{backend="memory",op="get"} 2.0' in text
    assert 'retserve_state_store_operation_seconds_bucket{backend="memory",le="+Inf",op="get"} 2.0' in text
    assert (
        registry.get_sample_value(
            "retserve_state_store_operations_total", {"backend": "memory", "op": "get", "outcome": "ok"}
        )
        == 1.0
    )
    with pytest.raises(ValueError, match="outcome"):
        metrics.observe("memory", "get", "bogus", 0.1)
