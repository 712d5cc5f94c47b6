"""The store contract: every backend (memory, and a real Redis at REDIS_URL) passes the same tests.

Includes the lock tests: two concurrent writers on one session (exactly one holds the lease), an
expired lease can be taken over, a non-owner cannot release, and the version check rejects a stale put.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from state_store import (
    InvalidKeyError,
    Lease,
    LockHeldError,
    LockNotHeldError,
    MemoryStateStore,
    Provenance,
    RedisStateStore,
    StateFormatError,
    StateStore,
    ValueTooLargeError,
    VersionConflictError,
)
from tests.support.state import (
    REDIS_URL,
    new_prefix,
    redis_cleanup,
    require_redis,
    run,
    tiny_blob,
    tiny_codec,
    tiny_state,
)

Factory = Callable[..., StateStore]
NS = "tenant-a"


@pytest.fixture(scope="module")
def redis_prefix() -> Iterator[str]:
    require_redis()
    prefix = new_prefix()
    yield prefix
    redis_cleanup(prefix)


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Factory:
    """A factory of stores that share data (two replicas on one Redis; one process's memory store)."""
    if request.param == "memory":
        shared = MemoryStateStore()
        return lambda **kw: shared if not kw else MemoryStateStore(**kw)
    prefix = request.getfixturevalue("redis_prefix") + uuid.uuid4().hex[:8] + ":"  # one per test
    return lambda **kw: RedisStateStore.from_url(REDIS_URL, prefix=prefix, **kw)


# ---- basic operations ----------------------------------------------------------------------------
def test_put_get_roundtrip_and_metadata(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as store:
            assert await store.get(NS, "s1") is None
            assert await store.get_info(NS, "s1") is None
            assert not await store.exists(NS, "s1")
            blob = tiny_blob()
            assert await store.put(NS, "s1", blob) == 1
            got = await store.get(NS, "s1")
            assert got is not None and got.data == blob
            assert (got.info.version, got.info.size, got.info.expires_in) == (1, len(blob), None)
            info = await store.get_info(NS, "s1")
            assert info is not None and info.version == 1 and info.meta.positions == (9,)
            assert info.meta.fingerprint == tiny_codec().fingerprint
            assert await store.exists(NS, "s1")
            decoded = tiny_codec().decode(got.data)
            assert decoded.state.equal(tiny_state())
            assert await store.put(NS, "s1", tiny_blob(1)) == 2
            got2 = await store.get(NS, "s1")
            assert got2 is not None and got2.data == tiny_blob(1) and got2.info.version == 2

    run(body())


def test_delete(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as store:
            await store.put(NS, "d1", tiny_blob())
            assert await store.delete(NS, "d1") is True
            assert await store.get(NS, "d1") is None and not await store.exists(NS, "d1")
            assert await store.delete(NS, "d1") is False
            assert await store.put(NS, "d1", tiny_blob()) == 1  # versions restart after a delete

    run(body())


def test_namespaces_are_separate(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as store:
            await store.put("tenant-x", "same", tiny_blob(0))
            await store.put("tenant-y", "same", tiny_blob(1))
            x, y = await store.get("tenant-x", "same"), await store.get("tenant-y", "same")
            assert x is not None and y is not None and x.data == tiny_blob(0) and y.data == tiny_blob(1)
            await store.delete("tenant-x", "same")
            assert await store.exists("tenant-y", "same")
            assert (await store.list("tenant-x")).sessions == []
            assert (await store.list("tenant-y")).sessions == ["same"]

    run(body())


def test_list_paginates_a_namespace(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as store:
            ids = [f"s{i:02d}" for i in range(23)]
            for sid in ids:
                await store.put("paged", sid, tiny_blob())
            await store.put("other", "s99", tiny_blob())
            seen: list[str] = []
            cursor = None
            for _ in range(50):
                page = await store.list("paged", cursor=cursor, limit=5)
                assert len(page.sessions) <= 5
                seen += page.sessions
                cursor = page.cursor
                if cursor is None:
                    break
            assert sorted(seen) == ids and len(seen) == len(ids)
            with pytest.raises(InvalidKeyError, match="cursor"):
                await store.list("paged", cursor="not-a-cursor")
            with pytest.raises(ValueError, match="limit"):
                await store.list("paged", limit=0)

    run(body())


def test_ttl_expiry_and_touch(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as store:
            await store.put(NS, "short", tiny_blob(), ttl=0.4)
            await store.put(NS, "kept", tiny_blob(), ttl=0.4)
            info = await store.get_info(NS, "short")
            assert info is not None and info.expires_in is not None and 0 < info.expires_in <= 0.4
            assert await store.touch(NS, "kept", 30)  # extend
            assert await store.touch(NS, "missing", 30) is False
            await asyncio.sleep(0.7)
            assert await store.get(NS, "short") is None and not await store.exists(NS, "short")
            assert (await store.list(NS)).sessions.count("short") == 0
            kept = await store.get(NS, "kept")
            assert kept is not None and kept.data == tiny_blob() and kept.info.expires_in > 25
            assert await store.touch(NS, "kept", None)  # remove the TTL
            info = await store.get_info(NS, "kept")
            assert info is not None and info.expires_in is None

    run(body())


def test_put_refuses_what_is_not_a_state(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as store:
            with pytest.raises(StateFormatError):
                await store.put(NS, "bad", b"definitely not a state")
            with pytest.raises(TypeError, match="bytes"):
                await store.put(NS, "bad", "text")  # type: ignore[arg-type]
            with pytest.raises(InvalidKeyError, match="session id"):
                await store.put(NS, "a}b", tiny_blob())
            with pytest.raises(InvalidKeyError, match="namespace"):
                await store.get("a:b", "s")
            with pytest.raises(ValueError, match="ttl"):
                await store.put(NS, "s", tiny_blob(), ttl=-1)
            assert not await store.exists(NS, "bad")
        async with make_store(max_value_bytes=100) as small:
            with pytest.raises(ValueTooLargeError, match="max_value_bytes"):
                await small.put(NS, "big", tiny_blob())

    run(body())


def test_provenance_survives_the_store(make_store: Factory) -> None:
    async def body() -> None:
        prov = Provenance(primed_from="sha256:" + "ab" * 32, merged_from=("tenant-a/x", "tenant-a/y"))
        blob = tiny_codec().encode(tiny_state(), provenance=prov, created_at=1000.0)
        async with make_store() as store:
            await store.put(NS, "prov", blob)
            info = await store.get_info(NS, "prov")
            assert info is not None and info.meta.provenance == prov and info.meta.created_at == 1000.0

    run(body())


# ---- optimistic versions ---------------------------------------------------------------------------
def test_version_check_rejects_a_stale_put(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as a, make_store() as b:
            assert await a.put(NS, "v", tiny_blob(), expected_version=0) == 1  # create-only
            with pytest.raises(VersionConflictError) as e0:
                await b.put(NS, "v", tiny_blob(), expected_version=0)
            assert e0.value.current == 1
            seen_a = await a.get_info(NS, "v")
            seen_b = await b.get_info(NS, "v")
            assert seen_a is not None and seen_b is not None
            assert await b.put(NS, "v", tiny_blob(1), expected_version=seen_b.version) == 2
            with pytest.raises(VersionConflictError, match="expected version 1") as e:
                await a.put(NS, "v", tiny_blob(2), expected_version=seen_a.version)
            assert (e.value.expected, e.value.current) == (1, 2)
            got = await a.get(NS, "v")
            assert got is not None and got.data == tiny_blob(1)  # the stale put changed nothing
            with pytest.raises(VersionConflictError):
                await a.delete(NS, "v", expected_version=1)
            assert await a.delete(NS, "v", expected_version=2)

    run(body())


def test_racing_versioned_puts_one_wins(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as a, make_store() as b:
            await a.put(NS, "race", tiny_blob())
            results = await asyncio.gather(
                *(s.put(NS, "race", tiny_blob(i), expected_version=1) for i, s in enumerate([a, b, a, b])),
                return_exceptions=True,
            )
            wins = [r for r in results if isinstance(r, int)]
            assert wins == [2] and sum(isinstance(r, VersionConflictError) for r in results) == 3

    run(body())


# ---- lease locks ------------------------------------------------------------------------------------
def test_two_concurrent_writers_exactly_one_holds_the_lock(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as a, make_store() as b:
            await a.put(NS, "locked", tiny_blob())
            start = asyncio.Event()
            holders: list[str] = []

            async def writer(store: StateStore, name: str) -> str:
                await start.wait()
                try:
                    lease = await store.acquire(NS, "locked", ttl=5)
                except LockHeldError:
                    return "refused"
                holders.append(name)
                await asyncio.sleep(0.2)  # hold it while the other tries
                info = await store.get_info(NS, "locked")
                assert info is not None
                await store.put(NS, "locked", tiny_blob(1), lease=lease, expected_version=info.version)
                assert await store.release(lease)
                return "wrote"

            tasks = [asyncio.create_task(writer(s, n)) for s, n in ((a, "a"), (b, "b"))]
            start.set()
            outcomes = sorted(await asyncio.gather(*tasks))
            assert outcomes == ["refused", "wrote"] and len(holders) == 1
            info = await a.get_info(NS, "locked")
            assert info is not None and info.version == 2

    run(body())


def test_waiting_writers_take_turns(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as a, make_store() as b:
            await a.put(NS, "turns", tiny_blob())
            inside = 0
            peak = 0

            async def writer(store: StateStore) -> None:
                nonlocal inside, peak
                async with store.locked(NS, "turns", ttl=5, wait=10) as lease:
                    inside += 1
                    peak = max(peak, inside)
                    info = await store.get_info(NS, "turns")
                    assert info is not None
                    await asyncio.sleep(0.05)
                    await store.put(NS, "turns", tiny_blob(), lease=lease, expected_version=info.version)
                    inside -= 1

            await asyncio.gather(writer(a), writer(b), writer(a), writer(b))
            info = await a.get_info(NS, "turns")
            assert peak == 1 and info is not None and info.version == 5  # 4 read-modify-writes, none lost

    run(body())


def test_locked_session_refuses_writes_without_the_lease(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as store:
            await store.put(NS, "guarded", tiny_blob())
            lease = await store.acquire(NS, "guarded", ttl=5)
            with pytest.raises(LockHeldError, match="leased by another") as e:
                await store.put(NS, "guarded", tiny_blob(1))
            assert e.value.expires_in is not None and 0 < e.value.expires_in <= 5
            with pytest.raises(LockHeldError):
                await store.delete(NS, "guarded")
            forged = Lease(NS, "guarded", "f" * 32, 5)
            with pytest.raises(LockNotHeldError):
                await store.put(NS, "guarded", tiny_blob(1), lease=forged)
            with pytest.raises(ValueError, match="lease is for"):
                await store.put(NS, "other", tiny_blob(1), lease=lease)
            assert await store.put(NS, "guarded", tiny_blob(1), lease=lease) == 2
            got = await store.get(NS, "guarded")  # reads need no lease
            assert got is not None and got.data == tiny_blob(1)
            await store.release(lease)
            assert await store.put(NS, "guarded", tiny_blob()) == 3  # free again

    run(body())


def test_non_owner_cannot_release(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as a, make_store() as b:
            lease = await a.acquire(NS, "owned", ttl=5)
            with pytest.raises(LockNotHeldError, match="another owner"):
                await b.release(Lease(NS, "owned", "0" * 32, 5))
            with pytest.raises(LockNotHeldError):
                await b.renew(Lease(NS, "owned", "0" * 32, 5))
            with pytest.raises(LockHeldError):
                await b.acquire(NS, "owned", ttl=5)  # still held: the release above did nothing
            renewed = await a.renew(lease, ttl=10)
            assert renewed.token == lease.token and renewed.ttl == 10
            assert await a.release(lease) is True
            assert await a.release(lease) is False  # nothing left to release
            assert isinstance(await b.acquire(NS, "owned", ttl=5), Lease)

    run(body())


def test_expired_lock_can_be_taken_over(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as a, make_store() as b:
            await a.put(NS, "exp", tiny_blob())
            old = await a.acquire(NS, "exp", ttl=0.3)
            with pytest.raises(LockHeldError):
                await b.acquire(NS, "exp", ttl=5)
            await asyncio.sleep(0.5)
            new = await b.acquire(NS, "exp", ttl=5)
            assert new.token != old.token
            with pytest.raises(LockNotHeldError, match="no longer held"):
                await a.put(NS, "exp", tiny_blob(1), lease=old)  # the old owner may not write now
            with pytest.raises(LockNotHeldError):
                await a.renew(old)
            with pytest.raises(LockNotHeldError, match="another owner"):
                await a.release(old)
            assert await b.put(NS, "exp", tiny_blob(1), lease=new) == 2
            assert await b.release(new)

    run(body())


def test_acquire_waits_for_release(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as a, make_store() as b:
            lease = await a.acquire(NS, "w", ttl=10)

            async def release_soon() -> None:
                await asyncio.sleep(0.2)
                await a.release(lease)

            t0 = time.monotonic()
            _, got = await asyncio.gather(release_soon(), b.acquire(NS, "w", ttl=5, wait=5, poll=0.02))
            assert 0.15 < time.monotonic() - t0 < 4 and got.token != lease.token
            with pytest.raises(LockHeldError):
                await a.acquire(NS, "w", ttl=5, wait=0.1)

    run(body())


def test_metrics_count_operations(make_store: Factory) -> None:
    async def body() -> None:
        async with make_store() as store:
            m, be = store.metrics, store.backend
            await store.put(NS, "m", tiny_blob())
            await store.get(NS, "m")
            await store.get(NS, "absent")
            with pytest.raises(VersionConflictError):
                await store.put(NS, "m", tiny_blob(), expected_version=7)
            assert m.count(be, "put", "ok") == 1 and m.count(be, "put", "conflict") == 1
            assert m.count(be, "get", "ok") == 1 and m.count(be, "get", "miss") == 1
            assert m.bytes(be, "put", "written") == len(tiny_blob())
            assert m.bytes(be, "get", "read") == len(tiny_blob())
            assert m.latency(be, "get").count == 2 and m.latency(be, "get").seconds_total > 0

    run(body())
