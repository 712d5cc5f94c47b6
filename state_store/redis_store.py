"""RedisStateStore: states in Redis (standalone or Cluster) through redis.asyncio with hiredis.

- Values are split into chunks of `chunk_bytes` (default 32 MiB, well under Redis's 512 MB
  proto-max-bulk-len), so a 2.7B-preset state (hundreds of MB) fits. A put uploads the chunks of a
  new generation, then a Lua script swaps the metadata atomically (version check and lease check
  included) and unlinks the old generation: readers see the old value or the new one, never a mix.
- Every key of a session carries the hash tag `{namespace:session}` (one Cluster slot); scripts and
  pipelines only ever touch one session's keys.
- Connection errors and timeouts are retried `retries` times with exponential backoff and jitter,
  then raise StoreUnavailable. Nothing needs restarting when Redis comes back: the pool reconnects
  and scripts are re-sent with EVAL when Redis answers NOSCRIPT after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from state_store import redis_scripts as scripts
from state_store.base import (
    EntryInfo,
    Page,
    StateStore,
    StoredState,
    conflict_error,
    lease_lost_error,
    locked_error,
)
from state_store.errors import (
    CorruptStateError,
    InvalidKeyError,
    StateCodecError,
    StateStoreError,
    StoreUnavailable,
)
from state_store.header import StateMeta
from state_store.keys import (
    SessionKeys,
    check_prefix,
    decode_cursor,
    encode_cursor,
    meta_scan_pattern,
    session_from_meta_key,
    session_keys,
)
from state_store.metrics import StoreMetrics

T = TypeVar("T")
DEFAULT_URL = "redis://127.0.0.1:6379/0"
REDIS_MAX_BULK = 512 * 1024 * 1024  # Redis's default proto-max-bulk-len
_RETRYABLE = (
    RedisConnectionError,  # includes BusyLoadingError, MaxConnectionsError
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    ReadOnlyError,
    RedisClusterException,
    OSError,
    TimeoutError,  # asyncio.timeout
)
_CAS_ATTEMPTS = 20  # re-reads when a concurrent writer changed the value between read and script


def redact_url(url: str) -> str:
    """The URL without its password (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username + ':***@' if parts.username else ':***@'}{host}"
    return urlunsplit(parts._replace(netloc=netloc + (f":{parts.port}" if parts.port else "")))


@dataclass(frozen=True)
class _Meta:
    version: int
    gen: str
    chunks: int
    size: int
    header: str
    expires_in: float | None

    @classmethod
    def parse(cls, h: dict[bytes, bytes], pttl: int, where: str) -> _Meta:
        try:
            return cls(
                int(h[b"v"]),
                h[b"g"].decode(),
                int(h[b"n"]),
                int(h[b"s"]),
                h[b"h"].decode(),
                None if pttl < 0 else pttl / 1000,
            )
        except (KeyError, ValueError, UnicodeDecodeError):
            raise CorruptStateError(
                f"the Redis metadata of {where} is malformed (written by something else?); delete the session"
            ) from None


class RedisStateStore(StateStore):
    """Build with `RedisStateStore.from_url(url)` (or pass a redis.asyncio Redis / RedisCluster)."""

    backend = "redis"

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = "retserve:",
        chunk_bytes: int = 32 * 1024 * 1024,
        retries: int = 3,
        backoff_base: float = 0.05,
        backoff_cap: float = 1.0,
        op_timeout: float = 60.0,
        orphan_ttl: float = 600.0,
        chunk_grace: float = 5.0,
        metrics: StoreMetrics | None = None,
        max_value_bytes: int = 1 << 32,
        description: str = "Redis",
        pool: BlockingConnectionPool | None = None,
    ) -> None:
        super().__init__(metrics=metrics, max_value_bytes=max_value_bytes)
        if not 1 <= chunk_bytes <= REDIS_MAX_BULK:
            raise ValueError(
                f"chunk_bytes must be in 1..{REDIS_MAX_BULK} (Redis's largest value), got {chunk_bytes}"
            )
        if retries < 0 or backoff_base < 0 or backoff_cap < 0 or op_timeout <= 0:
            raise ValueError("retries, backoff_base and backoff_cap must be >= 0 and op_timeout > 0")
        self._client = client
        self._pool = pool
        self.cluster = isinstance(client, RedisCluster)
        self.prefix = check_prefix(prefix)
        self.chunk_bytes = chunk_bytes
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.op_timeout = op_timeout
        self.orphan_ttl_ms = max(1, math.ceil(orphan_ttl * 1000))
        self.chunk_grace_ms = max(0, math.ceil(chunk_grace * 1000))
        self.description = description

    @classmethod
    def from_url(
        cls,
        url: str = DEFAULT_URL,
        *,
        cluster: bool = False,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        max_connections: int = 32,
        pool_timeout: float = 5.0,
        **kwargs: Any,
    ) -> RedisStateStore:
        """A store on `url` (redis://[user:pass@]host:port/db, rediss:// for TLS).

        `socket_timeout`: a read or write that stalls this long counts as Redis being down (and is
        retried). `cluster=True` uses redis-py's RedisCluster (url = any node of the cluster).
        """
        no_retry = Retry(NoBackoff(), 0)  # this class retries, with its own bounded backoff
        common: dict[str, Any] = dict(
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            socket_keepalive=True,
            retry=no_retry,
        )
        desc = f"Redis{' Cluster' if cluster else ''} at {redact_url(url)}"
        if cluster:
            client = RedisCluster.from_url(url, max_connections=max_connections, **common)
            return cls(client, description=desc, **kwargs)
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout, **common
        )
        return cls(Redis(connection_pool=pool), description=desc, pool=pool, **kwargs)

    async def close(self) -> None:
        await self._client.aclose()
        if self._pool is not None:
            await self._pool.aclose()

    async def ping(self) -> None:
        """StoreUnavailable unless Redis answers."""
        await self._call(lambda: self._client.ping())

    # ---- plumbing -------------------------------------------------------------------------------
    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one round trip with the timeout, retries and backoff; map failures to typed errors."""
        err: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
            try:
                async with asyncio.timeout(self.op_timeout):
                    return await fn()
            except _RETRYABLE as e:
                err = e
            except ResponseError as e:
                if str(e).startswith("OOM"):
                    raise StateStoreError(
                        f"{self.description} is out of memory (maxmemory) and refused the write: {e}"
                    ) from e
                raise StateStoreError(f"{self.description} refused a command: {e}") from e
            except RedisError as e:
                raise StateStoreError(f"{self.description} failed: {e}") from e
        raise StoreUnavailable(
            f"{self.description} is unavailable ({type(err).__name__}: {err or 'timed out'}) after"
            f" {self.retries + 1} attempts; check that Redis is running and reachable (the store reconnects"
            " by itself once it is)"
        ) from err

    async def _script(self, script: scripts.Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        async def run() -> Any:
            try:
                return await self._client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:  # first use, or Redis restarted: send the source
                return await self._client.execute_command("EVAL", script.source, len(keys), *keys, *args)

        return await self._call(run)

    def _keys(self, namespace: str, session: str) -> SessionKeys:
        return session_keys(self.prefix, namespace, session)

    async def _read_meta(self, k: SessionKeys, where: str) -> _Meta | None:
        async def fn() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(k.meta)
            pipe.pttl(k.meta)
            return await pipe.execute()

        h, pttl = await self._call(fn)
        return _Meta.parse(h, int(pttl), where) if h else None

    def _status(self, res: Any, namespace: str, session: str, expected: int | None) -> tuple[str, int]:
        status, n = res[0].decode(), int(res[1])
        if status == "locked":
            raise locked_error(namespace, session, n / 1000 if n >= 0 else None)
        if status == "lost":
            raise lease_lost_error(namespace, session)
        if status == "conflict":
            raise conflict_error(namespace, session, expected if expected is not None else -1, n)
        return status, n

    # ---- primitives -----------------------------------------------------------------------------
    async def _get_info(self, namespace: str, session: str) -> EntryInfo | None:
        m = await self._read_meta(self._keys(namespace, session), f"{namespace}/{session}")
        return None if m is None else self._info(namespace, session, m)

    def _info(self, namespace: str, session: str, m: _Meta) -> EntryInfo:
        try:
            meta = StateMeta.loads(m.header)
        except StateCodecError as e:
            raise CorruptStateError(f"the stored header of {namespace}/{session} is invalid: {e}") from None
        return EntryInfo(namespace, session, m.version, m.size, meta, m.expires_in)

    async def _get(self, namespace: str, session: str) -> StoredState | None:
        k, where = self._keys(namespace, session), f"{namespace}/{session}"
        for _ in range(_CAS_ATTEMPTS):
            m = await self._read_meta(k, where)
            if m is None:
                return None
            keys = k.chunks(m.gen, m.chunks)

            async def fetch(keys: list[str] = keys) -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.get(key)
                return await pipe.execute()

            parts = await self._call(fetch)
            if all(p is not None for p in parts):
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                if len(data) != m.size:
                    raise CorruptStateError(f"{where}: stored {len(data)} bytes, its metadata says {m.size}")
                return StoredState(self._info(namespace, session, m), data)
            # A put or delete replaced this generation between our two reads: read again.
        raise CorruptStateError(
            f"{where}: the value's data chunks are missing (evicted? use maxmemory-policy noeviction"
            " or volatile-*); delete the session and save it again"
        )

    async def _put(
        self,
        namespace: str,
        session: str,
        data: bytes,
        meta_json: str,
        ttl_ms: int | None,
        expected_version: int | None,
        token: str | None,
    ) -> int:
        k, where = self._keys(namespace, session), f"{namespace}/{session}"
        gen = secrets.token_hex(8)
        n = max(1, math.ceil(len(data) / self.chunk_bytes))
        new_keys = k.chunks(gen, n)
        view = memoryview(data)

        async def upload() -> None:
            pipe = self._client.pipeline(transaction=False)
            for i, key in enumerate(new_keys):
                pipe.set(key, view[i * self.chunk_bytes : (i + 1) * self.chunk_bytes], px=self.orphan_ttl_ms)
            await pipe.execute()

        try:
            await self._call(upload)
            for _ in range(_CAS_ATTEMPTS):
                m = await self._read_meta(k, where)
                old = k.chunks(m.gen, m.chunks) if m else []
                expected = "" if expected_version is None else expected_version
                args = [
                    m.gen if m else "", gen, expected, token or "", ttl_ms or 0, n, len(data), meta_json,
                    self.chunk_grace_ms,
                ]  # fmt: skip
                res = await self._script(scripts.COMMIT, [k.meta, k.lock, *new_keys, *old], args)
                status, v = self._status(res, namespace, session, expected_version)
                if status == "ok":
                    return v
                if status == "missing":
                    raise StateStoreError(
                        f"{where}: an uploaded chunk vanished before the commit (evicted by Redis, or the"
                        " upload took longer than orphan_ttl); retry the put"
                    )
            raise StateStoreError(f"{where}: other writers kept replacing the value; retry the put")
        except StoreUnavailable:
            raise  # Redis is away: the uploaded chunks expire after orphan_ttl
        except BaseException:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._client.unlink(*new_keys)  # or they expire after orphan_ttl
            raise

    async def _delete(
        self, namespace: str, session: str, expected_version: int | None, token: str | None
    ) -> bool:
        k, where = self._keys(namespace, session), f"{namespace}/{session}"
        for _ in range(_CAS_ATTEMPTS):
            m = await self._read_meta(k, where)
            old = k.chunks(m.gen, m.chunks) if m else []
            args = [m.gen if m else "", "" if expected_version is None else expected_version, token or ""]
            res = await self._script(scripts.DELETE, [k.meta, k.lock, *old], args)
            status, _ = self._status(res, namespace, session, expected_version)
            if status != "retry":
                return status == "ok"
        raise StateStoreError(f"{where}: other writers kept replacing the value; retry the delete")

    async def _exists(self, namespace: str, session: str) -> bool:
        return bool(await self._call(lambda: self._client.exists(self._keys(namespace, session).meta)))

    async def _touch(self, namespace: str, session: str, ttl_ms: int | None) -> bool:
        k, where = self._keys(namespace, session), f"{namespace}/{session}"
        for _ in range(_CAS_ATTEMPTS):
            m = await self._read_meta(k, where)
            if m is None:
                return False
            res = await self._script(
                scripts.TOUCH, [k.meta, *k.chunks(m.gen, m.chunks)], [m.gen, ttl_ms or 0, self.chunk_grace_ms]
            )
            if int(res) >= 0:
                return int(res) == 1
        raise StateStoreError(f"{where}: other writers kept replacing the value; retry the touch")

    async def _acquire(
        self, namespace: str, session: str, token: str, ttl_ms: int
    ) -> tuple[bool, float | None]:
        got, pttl = await self._script(
            scripts.ACQUIRE, [self._keys(namespace, session).lock], [token, ttl_ms]
        )
        return bool(int(got)), (int(pttl) / 1000 if int(pttl) >= 0 else None)

    async def _renew(self, namespace: str, session: str, token: str, ttl_ms: int) -> bool:
        return (
            int(await self._script(scripts.RENEW, [self._keys(namespace, session).lock], [token, ttl_ms]))
            == 1
        )

    async def _release(self, namespace: str, session: str, token: str) -> int:
        return int(await self._script(scripts.RELEASE, [self._keys(namespace, session).lock], [token]))

    # ---- listing --------------------------------------------------------------------------------
    async def _scan_nodes(self) -> list[str]:
        if not self.cluster:
            return ["-"]
        client = self._client
        assert isinstance(client, RedisCluster)
        await self._call(client.initialize)
        return sorted(n.name for n in client.get_primaries())

    async def _scan(self, node: str, cursor: int, pattern: str, count: int) -> tuple[int, list[bytes]]:
        kw: dict[str, Any] = {}
        if self.cluster:
            client = self._client
            assert isinstance(client, RedisCluster)
            target = client.get_node(node_name=node)
            if target is None:
                raise StoreUnavailable(
                    f"{self.description}: node {node} left the cluster during a listing; restart it"
                )
            kw["target_nodes"] = target
        res = await self._call(
            lambda: self._client.execute_command("SCAN", cursor, "MATCH", pattern, "COUNT", count, **kw)
        )
        nxt, keys = res
        if isinstance(nxt, dict):  # the cluster client returns {node name: cursor}
            nxt = next(iter(nxt.values()), 0)
        return int(nxt), list(keys)

    async def _list(self, namespace: str, cursor: str | None, limit: int) -> Page:
        nodes = await self._scan_nodes()
        node_i, scan_c, pending = 0, 0, []
        if cursor is not None:
            c = decode_cursor(cursor, "redis")
            node, scan_c, pending = c.get("n"), c.get("c"), c.get("p")
            if (
                not isinstance(node, str)
                or not isinstance(scan_c, int)
                or scan_c < 0
                or not isinstance(pending, list)
                or not all(isinstance(p, str) for p in pending)
            ):
                raise InvalidKeyError("list cursor is malformed: pass the cursor the previous page returned")
            node_i = nodes.index(node) if node in nodes else len(nodes)
        pattern = meta_scan_pattern(self.prefix, namespace)
        out: list[str] = []
        seen: set[str] = set()
        while True:
            while pending and len(out) < limit:
                sid = pending.pop(0)
                if sid not in seen:
                    seen.add(sid)
                    out.append(sid)
            if len(out) >= limit or node_i >= len(nodes):
                break
            count = max(10, min(1000, limit - len(out)))  # keeps the overflow carried in the cursor small
            scan_c, keys = await self._scan(nodes[node_i], scan_c, pattern, count)
            for key in keys:
                sid = session_from_meta_key(self.prefix, namespace, key.decode(errors="replace"))
                if sid is not None:
                    pending.append(sid)
            if scan_c == 0:
                node_i += 1
        if not pending and node_i >= len(nodes):
            return Page(out, None)
        node_name = nodes[node_i] if node_i < len(nodes) else "-end-"
        return Page(out, encode_cursor({"k": "redis", "n": node_name, "c": scan_c, "p": pending}))
