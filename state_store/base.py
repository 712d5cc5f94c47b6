"""The async store protocol shared by every backend, and the records it returns.

A store keeps encoded states (bytes made by `StateCodec.encode`) under (namespace, session id).
Namespaces separate tenants. Every value has a version (1 on first put, +1 per put) for optimistic
concurrency (versions restart at 1 after a delete or expiry), an optional TTL, and a per-session
lease lock:

- `put(..., expected_version=n)` fails with VersionConflictError unless the stored version is n
  (0 = "must not exist yet"); None writes unconditionally.
- While a session is leased, `put` and `delete` need the holder's `lease` (LockHeldError otherwise);
  a lease that expired or was taken over gives LockNotHeldError.
- `acquire` takes the lease (or waits up to `wait` seconds); an expired lease can be taken over;
  only the owner's token can renew or release it.

A store object belongs to the event loop it is first used in. Subclasses implement the underscored
primitives; this class validates arguments, turns TTLs into
milliseconds and records metrics for every public operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from state_store.errors import (
    InvalidKeyError,
    LockError,
    LockHeldError,
    LockNotHeldError,
    StateStoreError,
    StoreUnavailable,
    ValueTooLargeError,
    VersionConflictError,
)
from state_store.header import StateMeta, read_meta
from state_store.keys import check_name
from state_store.metrics import StoreMetrics

T = TypeVar("T")
MAX_TTL_S = 10 * 365 * 86400.0
MAX_LIST_LIMIT = 10_000


@dataclass(frozen=True)
class EntryInfo:
    """A stored state's metadata (no tensor bytes)."""

    namespace: str
    session: str
    version: int
    size: int  # bytes of the encoded state
    meta: StateMeta  # the codec header: fingerprint, dtype, positions, times, provenance
    expires_in: float | None  # seconds until the TTL expires; None = no TTL


@dataclass(frozen=True)
class StoredState:
    info: EntryInfo
    data: bytes  # decode with StateCodec.decode


@dataclass(frozen=True)
class Lease:
    """Proof of holding a session's lock until `ttl` seconds after it was acquired or renewed."""

    namespace: str
    session: str
    token: str
    ttl: float


@dataclass(frozen=True)
class Page:
    sessions: list[str]
    cursor: str | None  # pass to the next list() call; None = this was the last page


def ttl_ms(ttl: float | None, what: str = "ttl") -> int | None:
    """Seconds -> whole milliseconds (at least 1); None stays None (no expiry)."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"{what} must be None or a positive number of seconds, got {ttl!r}")
    if ttl > MAX_TTL_S:
        raise ValueError(f"{what} must be at most {MAX_TTL_S:.0f} seconds (10 years), got {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


def locked_error(namespace: str, session: str, expires_in: float | None) -> LockHeldError:
    when = f"; it expires in {expires_in:.3f}s" if expires_in is not None else ""
    return LockHeldError(
        f"session {namespace}/{session} is leased by another request{when}: acquire the lease"
        " (or wait for it) and pass it to put/delete",
        expires_in=expires_in,
    )


def lease_lost_error(namespace: str, session: str) -> LockNotHeldError:
    return LockNotHeldError(
        f"this lease on {namespace}/{session} is no longer held (it expired or was taken over):"
        " acquire a new lease and re-read the session before writing"
    )


def conflict_error(namespace: str, session: str, expected: int, current: int) -> VersionConflictError:
    have = f"version {current}" if current else "no stored state"
    return VersionConflictError(
        f"{namespace}/{session}: expected version {expected}, the store has {have};"
        " re-read the session and retry with its current version",
        expected=expected,
        current=current,
    )


class StateStore(ABC):
    """Async key-value store of encoded session states. Use `async with store:` or `await store.close()`."""

    backend: ClassVar[str] = "abstract"

    def __init__(self, *, metrics: StoreMetrics | None = None, max_value_bytes: int = 1 << 32) -> None:
        if max_value_bytes < 1:
            raise ValueError(f"max_value_bytes must be positive, got {max_value_bytes}")
        self.metrics = metrics if metrics is not None else StoreMetrics()
        self.max_value_bytes = max_value_bytes

    # ---- public API ---------------------------------------------------------------------------
    async def get(self, namespace: str, session: str) -> StoredState | None:
        """The stored bytes and metadata, or None if there is no such session (or it expired)."""
        _names(namespace, session)
        r = await self._measure("get", self._get(namespace, session), miss=lambda r: r is None)
        if r is not None:
            self.metrics.add_bytes(self.backend, "get", "read", len(r.data))
        return r

    async def get_info(self, namespace: str, session: str) -> EntryInfo | None:
        """Metadata only (version, size, codec header, TTL): no state bytes are transferred."""
        _names(namespace, session)
        return await self._measure("get_info", self._get_info(namespace, session), miss=lambda r: r is None)

    async def put(
        self,
        namespace: str,
        session: str,
        data: bytes,
        *,
        ttl: float | None = None,
        expected_version: int | None = None,
        lease: Lease | None = None,
    ) -> int:
        """Store an encoded state; returns its new version. See the module doc for the checks."""
        _names(namespace, session)
        if not isinstance(data, bytes):
            raise TypeError(f"put stores bytes from StateCodec.encode, got {type(data).__name__}")
        if len(data) > self.max_value_bytes:
            raise ValueTooLargeError(
                f"value of {len(data)} bytes exceeds this store's max_value_bytes={self.max_value_bytes}"
            )
        meta, _ = read_meta(data)  # refuse anything that is not an encoded state (StateCodecError)
        ms = ttl_ms(ttl)
        if expected_version is not None and (
            not isinstance(expected_version, int)
            or isinstance(expected_version, bool)
            or expected_version < 0
        ):
            raise ValueError(f"expected_version must be None or an integer >= 0, got {expected_version!r}")
        token = self._lease_token(lease, namespace, session)
        v = await self._measure(
            "put", self._put(namespace, session, data, meta.dumps(), ms, expected_version, token)
        )
        self.metrics.add_bytes(self.backend, "put", "written", len(data))
        return v

    async def delete(
        self,
        namespace: str,
        session: str,
        *,
        expected_version: int | None = None,
        lease: Lease | None = None,
    ) -> bool:
        """Delete a session's state; False if there was none. The lease lock itself is not removed."""
        _names(namespace, session)
        if expected_version is not None and (not isinstance(expected_version, int) or expected_version < 1):
            raise ValueError(f"expected_version must be None or an integer >= 1, got {expected_version!r}")
        token = self._lease_token(lease, namespace, session)
        return await self._measure(
            "delete", self._delete(namespace, session, expected_version, token), miss=lambda r: not r
        )

    async def exists(self, namespace: str, session: str) -> bool:
        _names(namespace, session)
        return await self._measure("exists", self._exists(namespace, session), miss=lambda r: not r)

    async def touch(self, namespace: str, session: str, ttl: float | None) -> bool:
        """Set (or with None, remove) the TTL of a stored state; False if there is none."""
        _names(namespace, session)
        return await self._measure(
            "touch", self._touch(namespace, session, ttl_ms(ttl)), miss=lambda r: not r
        )

    async def list(self, namespace: str, *, cursor: str | None = None, limit: int = 100) -> Page:
        """Up to `limit` session ids of a namespace, and the cursor of the next page (None at the end).

        Paging through a namespace returns every session that exists for the whole walk at least
        once; sessions created or deleted meanwhile may or may not appear.
        """
        check_name("namespace", namespace)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be an integer in 1..{MAX_LIST_LIMIT}, got {limit!r}")
        if cursor is not None and not isinstance(cursor, str):
            raise InvalidKeyError("cursor must be None or the string returned by the previous page")
        return await self._measure("list", self._list(namespace, cursor, limit))

    async def acquire(
        self, namespace: str, session: str, ttl: float, *, wait: float = 0.0, poll: float = 0.05
    ) -> Lease:
        """Take the session's lease for `ttl` seconds; LockHeldError if still held after `wait` seconds."""
        _names(namespace, session)
        ms = ttl_ms(ttl, "lease ttl")
        assert ms is not None
        if wait < 0 or poll <= 0:
            raise ValueError("wait must be >= 0 and poll > 0 seconds")
        token = secrets.token_hex(16)
        deadline = time.monotonic() + wait

        async def attempt() -> Lease:
            while True:
                got, expires_in = await self._acquire(namespace, session, token, ms)
                if got:
                    return Lease(namespace, session, token, ttl)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise locked_error(namespace, session, expires_in)
                await asyncio.sleep(min(poll, left))

        return await self._measure("acquire", attempt())

    async def renew(self, lease: Lease, ttl: float | None = None) -> Lease:
        """Extend a held lease (to `ttl`, default its own); LockNotHeldError if it was lost."""
        _check_lease(lease)
        new_ttl = lease.ttl if ttl is None else ttl
        ms = ttl_ms(new_ttl, "lease ttl")
        assert ms is not None

        async def run() -> Lease:
            if not await self._renew(lease.namespace, lease.session, lease.token, ms):
                raise lease_lost_error(lease.namespace, lease.session)
            return Lease(lease.namespace, lease.session, lease.token, new_ttl)

        return await self._measure("renew", run())

    async def release(self, lease: Lease) -> bool:
        """Release a lease: True if released, False if it had already expired and nobody holds it.

        Raises LockNotHeldError if another owner holds the session (only the owner may release).
        """
        _check_lease(lease)

        async def run() -> bool:
            r = await self._release(lease.namespace, lease.session, lease.token)
            if r < 0:
                raise LockNotHeldError(
                    f"cannot release {lease.namespace}/{lease.session}: another owner holds its lease"
                    " (this one expired and was taken over)"
                )
            return r > 0

        return await self._measure("release", run())

    @asynccontextmanager
    async def locked(
        self, namespace: str, session: str, ttl: float, *, wait: float = 0.0
    ) -> AsyncIterator[Lease]:
        """`async with store.locked(ns, sid, ttl) as lease:` acquire, and release on exit."""
        lease = await self.acquire(namespace, session, ttl, wait=wait)
        try:
            yield lease
        finally:
            # Lost or unreachable: the TTL frees it; the body's own outcome matters more.
            with contextlib.suppress(LockNotHeldError, StoreUnavailable):
                await self.release(lease)

    async def close(self) -> None:  # noqa: B027 - optional for backends
        """Release connections (no-op for the memory store)."""

    async def ping(self) -> None:  # noqa: B027 - optional for backends
        """Raise StoreUnavailable unless the backend answers (always answers for the memory store)."""

    async def __aenter__(self) -> StateStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _lease_token(lease: Lease | None, namespace: str, session: str) -> str | None:
        if lease is None:
            return None
        _check_lease(lease)
        if (lease.namespace, lease.session) != (namespace, session):
            raise ValueError(f"the lease is for {lease.namespace}/{lease.session}, not {namespace}/{session}")
        return lease.token

    async def _measure(self, op: str, aw: Awaitable[T], miss: Callable[[T], bool] | None = None) -> T:
        t0 = time.perf_counter()
        outcome = "error"
        try:
            r = await aw
            outcome = "miss" if miss is not None and miss(r) else "ok"
            return r
        except VersionConflictError:
            outcome = "conflict"
            raise
        except LockError:
            outcome = "locked"
            raise
        except StoreUnavailable:
            outcome = "unavailable"
            raise
        except StateStoreError:
            outcome = "rejected"
            raise
        finally:
            self.metrics.observe(self.backend, op, outcome, time.perf_counter() - t0)

    # ---- backend primitives ------------------------------------------------------------------
    @abstractmethod
    async def _get(self, namespace: str, session: str) -> StoredState | None: ...

    @abstractmethod
    async def _get_info(self, namespace: str, session: str) -> EntryInfo | None: ...

    @abstractmethod
    async def _put(
        self,
        namespace: str,
        session: str,
        data: bytes,
        meta_json: str,
        ttl_ms: int | None,
        expected_version: int | None,
        token: str | None,
    ) -> int: ...

    @abstractmethod
    async def _delete(
        self, namespace: str, session: str, expected_version: int | None, token: str | None
    ) -> bool: ...

    @abstractmethod
    async def _exists(self, namespace: str, session: str) -> bool: ...

    @abstractmethod
    async def _touch(self, namespace: str, session: str, ttl_ms: int | None) -> bool: ...

    @abstractmethod
    async def _list(self, namespace: str, cursor: str | None, limit: int) -> Page: ...

    @abstractmethod
    async def _acquire(
        self, namespace: str, session: str, token: str, ttl_ms: int
    ) -> tuple[bool, float | None]: ...

    @abstractmethod
    async def _renew(self, namespace: str, session: str, token: str, ttl_ms: int) -> bool: ...

    @abstractmethod
    async def _release(self, namespace: str, session: str, token: str) -> int:
        """1 released, 0 nobody holds it, -1 another owner holds it."""


def _names(namespace: str, session: str) -> None:
    check_name("namespace", namespace)
    check_name("session id", session)


def _check_lease(lease: Any) -> None:
    if not isinstance(lease, Lease):
        raise TypeError(f"expected a Lease from store.acquire(), got {type(lease).__name__}")
    _names(lease.namespace, lease.session)
