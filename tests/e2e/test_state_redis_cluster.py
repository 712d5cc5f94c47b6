"""The Redis Cluster path against a real 3-primary cluster that this test builds from redis-server
processes on free ports (redis-cli --cluster create), and tears down afterwards."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from state_store import LockHeldError, RedisStateStore, VersionConflictError
from state_store.keys import key_slot, session_keys
from tests.support.state import RedisServer, redis_missing, run, tiny_blob


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    cli = shutil.which("redis-cli")
    if cli is None:
        redis_missing("redis-cli is not on PATH (it comes with redis-server)")
    nodes: list[RedisServer] = []
    try:
        for i in range(3):
            d = tmp_path_factory.mktemp(f"cluster{i}")
            node = RedisServer(d, ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
            node.start()
            nodes.append(node)
        addrs = [f"127.0.0.1:{n.port}" for n in nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        for n in nodes:
            c = redis.Redis(port=n.port)
            while c.cluster("info").get("cluster_state") != "ok":
                assert time.monotonic() < deadline, "the test cluster did not become ready"
                time.sleep(0.1)
            c.close()
        yield nodes
    finally:
        for n in nodes:
            n.kill()


def test_store_works_on_a_real_cluster(cluster: list[RedisServer]) -> None:
    blob = tiny_blob()

    async def body() -> None:
        url = cluster[0].url.rsplit("/", 1)[0]
        async with (
            RedisStateStore.from_url(url, cluster=True, prefix="rc:", chunk_bytes=1000) as a,
            RedisStateStore.from_url(url, cluster=True, prefix="rc:", chunk_bytes=1000) as b,
        ):
            ids = [f"s{i}" for i in range(40)]
            for sid in ids:
                assert await a.put("ns", sid, blob, ttl=60) == 1  # 18 chunks each, all in the session's slot
            slots = {key_slot(session_keys("rc:", "ns", sid).meta) for sid in ids}
            owners = {cluster_node_of(cluster, s) for s in slots}
            assert len(owners) == 3  # the sessions really are spread over the three primaries
            assert all(_dbsize(n) > 0 for n in cluster)  # and every primary holds some of the keys
            got = await b.get("ns", "s7")
            assert got is not None and got.data == blob
            seen: list[str] = []
            cursor = None
            while True:  # list walks every primary
                page = await b.list("ns", cursor=cursor, limit=7)
                assert len(page.sessions) <= 7
                seen += page.sessions
                cursor = page.cursor
                if cursor is None:
                    break
            assert sorted(seen) == sorted(ids)
            assert await a.put("ns", "s7", blob, expected_version=1) == 2
            with pytest.raises(VersionConflictError):
                await b.put("ns", "s7", blob, expected_version=1)
            lease = await a.acquire("ns", "s7", ttl=5)
            with pytest.raises(LockHeldError):
                await b.put("ns", "s7", blob)
            assert await a.put("ns", "s7", blob, lease=lease) == 3
            assert await a.release(lease)
            assert await b.touch("ns", "s7", None)
            info = await b.get_info("ns", "s7")
            assert info is not None and info.expires_in is None and info.version == 3
            for sid in ids:
                assert await b.delete("ns", sid)
            assert (await a.list("ns")).sessions == []

    run(body())
    assert [_dbsize(n) for n in cluster] == [0, 0, 0]  # nothing left behind on any node


def _dbsize(node: RedisServer) -> int:
    c = redis.Redis(port=node.port)
    try:
        return int(c.dbsize())
    finally:
        c.close()


def cluster_node_of(cluster: list[RedisServer], slot: int) -> int:
    c = redis.Redis(port=cluster[0].port)
    try:
        for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
    finally:
        c.close()
    raise AssertionError(f"slot {slot} is not served")


def test_server_sessions_on_a_cluster(cluster: list[RedisServer]) -> None:
    """The HTTP server with RETSERVE_STORE_URL=redis+cluster://...: sessions work end to end."""
    import httpx

    from tests.support.server import run_server

    url = "redis+cluster://" + cluster[1].url.removeprefix("redis://").rsplit("/", 1)[0]
    with run_server({"RETSERVE_STORE_URL": url}) as base, httpx.Client(base_url=base, timeout=60) as c:
        assert c.get("/ready").status_code == 200
        ids = []
        for i in range(6):  # spread over slots / nodes
            r = c.post("/v1/sessions", json={"prompt": f"Document number {i} is here."})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        listed = c.get("/v1/sessions", params={"limit": 100}).json()["data"]
        assert {s["id"] for s in listed} >= set(ids)
        body = {"prompt": " And", "max_tokens": 5, "temperature": 0}
        blob = c.get(f"/v1/sessions/{ids[0]}/state").content
        first = c.post(f"/v1/sessions/{ids[0]}/generate", json=body).json()["choices"][0]["text"]
        assert c.put(f"/v1/sessions/{ids[0]}/state", content=blob).status_code == 200
        again = c.post(f"/v1/sessions/{ids[0]}/generate", json=body).json()["choices"][0]["text"]
        assert first == again
        for sid in ids:
            assert c.delete(f"/v1/sessions/{sid}").status_code == 200
