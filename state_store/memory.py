"""MemoryStateStore: the embedded default. In-process, byte-budgeted LRU, TTLs, the same locks and errors.

Everything happens in the event loop's thread without awaiting inside a critical section, so each
operation is atomic with respect to other coroutines. States are lost when the process exits.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from state_store.base import (
    EntryInfo,
    Page,
    StateStore,
    StoredState,
    conflict_error,
    lease_lost_error,
    locked_error,
)
from state_store.errors import ValueTooLargeError
from state_store.header import StateMeta
from state_store.keys import decode_cursor, encode_cursor
from state_store.metrics import StoreMetrics

_Key = tuple[str, str]


@dataclass
class _Entry:
    data: bytes
    meta: StateMeta
    version: int
    expires_at: float | None  # clock() time


class MemoryStateStore(StateStore):
    """In-process store bounded by `max_bytes` (sum of stored values); least recently used go first.

    `clock` (monotonic seconds) can be replaced in tests. `evictions` counts LRU evictions.
    """

    backend = "memory"

    def __init__(
        self,
        max_bytes: int = 1 << 30,
        *,
        max_value_bytes: int | None = None,
        metrics: StoreMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        super().__init__(metrics=metrics, max_value_bytes=min(max_bytes, max_value_bytes or max_bytes))
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._locks: dict[_Key, tuple[str, float]] = {}
        self.used_bytes = 0
        self.evictions = 0

    # ---- internals ------------------------------------------------------------------------------
    def _live(self, key: _Key) -> _Entry | None:
        e = self._entries.get(key)
        if e is not None and e.expires_at is not None and e.expires_at <= self._clock():
            self._drop(key)
            return None
        return e

    def _drop(self, key: _Key) -> None:
        e = self._entries.pop(key)
        self.used_bytes -= len(e.data)

    def _holder(self, key: _Key) -> tuple[str, float] | None:
        h = self._locks.get(key)
        if h is not None and h[1] <= self._clock():
            del self._locks[key]
            return None
        return h

    def _check_lock(self, key: _Key, token: str | None) -> None:
        h = self._holder(key)
        if token is None:
            if h is not None:
                raise locked_error(*key, h[1] - self._clock())
        elif h is None or h[0] != token:
            raise lease_lost_error(*key)

    def _expiry(self, ttl_ms: int | None) -> float | None:
        return None if ttl_ms is None else self._clock() + ttl_ms / 1000

    def _info(self, key: _Key, e: _Entry) -> EntryInfo:
        left = None if e.expires_at is None else max(0.0, e.expires_at - self._clock())
        return EntryInfo(key[0], key[1], e.version, len(e.data), e.meta, left)

    # ---- primitives -----------------------------------------------------------------------------
    async def _get(self, namespace: str, session: str) -> StoredState | None:
        key = (namespace, session)
        e = self._live(key)
        if e is None:
            return None
        self._entries.move_to_end(key)
        return StoredState(self._info(key, e), e.data)

    async def _get_info(self, namespace: str, session: str) -> EntryInfo | None:
        key = (namespace, session)
        e = self._live(key)
        return None if e is None else self._info(key, e)

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
        key = (namespace, session)
        if len(data) > self.max_bytes:
            raise ValueTooLargeError(
                f"value of {len(data)} bytes exceeds the memory store's max_bytes={self.max_bytes}"
            )
        self._check_lock(key, token)
        old = self._live(key)
        current = old.version if old else 0
        if expected_version is not None and expected_version != current:
            raise conflict_error(namespace, session, expected_version, current)
        if old is not None:
            self._drop(key)
        entry = _Entry(data, StateMeta.loads(meta_json), current + 1, self._expiry(ttl_ms))
        self._entries[key] = entry
        self.used_bytes += len(data)
        while self.used_bytes > self.max_bytes:
            victim = next(iter(self._entries))
            self._drop(victim)
            self.evictions += 1
        return entry.version

    async def _delete(
        self, namespace: str, session: str, expected_version: int | None, token: str | None
    ) -> bool:
        key = (namespace, session)
        self._check_lock(key, token)
        e = self._live(key)
        current = e.version if e else 0
        if expected_version is not None and expected_version != current:
            raise conflict_error(namespace, session, expected_version, current)
        if e is None:
            return False
        self._drop(key)
        return True

    async def _exists(self, namespace: str, session: str) -> bool:
        return self._live((namespace, session)) is not None

    async def _touch(self, namespace: str, session: str, ttl_ms: int | None) -> bool:
        e = self._live((namespace, session))
        if e is None:
            return False
        e.expires_at = self._expiry(ttl_ms)
        return True

    async def _list(self, namespace: str, cursor: str | None, limit: int) -> Page:
        after = ""
        if cursor is not None:
            c = decode_cursor(cursor, "memory")
            after = c.get("a")
            if not isinstance(after, str):
                after = ""
        ids = sorted(
            s for (ns, s) in list(self._entries) if ns == namespace and s > after and self._live((ns, s))
        )
        page = ids[:limit]
        more = len(ids) > limit
        return Page(page, encode_cursor({"k": "memory", "a": page[-1]}) if more else None)

    async def _acquire(
        self, namespace: str, session: str, token: str, ttl_ms: int
    ) -> tuple[bool, float | None]:
        key = (namespace, session)
        h = self._holder(key)
        if h is not None and h[0] != token:
            return False, h[1] - self._clock()
        self._locks[key] = (token, self._clock() + ttl_ms / 1000)
        return True, None

    async def _renew(self, namespace: str, session: str, token: str, ttl_ms: int) -> bool:
        key = (namespace, session)
        h = self._holder(key)
        if h is None or h[0] != token:
            return False
        self._locks[key] = (token, self._clock() + ttl_ms / 1000)
        return True

    async def _release(self, namespace: str, session: str, token: str) -> int:
        key = (namespace, session)
        h = self._holder(key)
        if h is None:
            return 0
        if h[0] != token:
            return -1
        del self._locks[key]
        return 1
