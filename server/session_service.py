"""Sessions as the HTTP layer uses them: one lease context (`async with service.lease(...)`), load, save.

Leases are short (RETSERVE_SESSION_LOCK_TTL_S, a few seconds) and renewed in the background while a
request holds one (every RETSERVE_SESSION_LOCK_RENEW_S), so the leases of a server that died expire
within seconds. A lease that cannot be released because the store is unreachable goes to a retry
queue: `retry_releases()` (a background task of the runtime) releases it as soon as the store answers
again, so a Redis restarted from its AOF (lease keys included) does not answer 409 session_busy for
sessions whose requests ended during the outage.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from prometheus_client import Histogram
from torch import Tensor

from model.state import RetentionState
from server.errors import APIError
from server.settings import Settings
from state_store import (
    EntryInfo,
    Lease,
    LoadedState,
    LockHeldError,
    LockNotHeldError,
    Provenance,
    SessionStates,
    StateCodecError,
    StateStoreError,
    StoreUnavailable,
    VersionConflictError,
)

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.05  # release retries: first delay, doubled while the store stays unreachable ...
RETRY_MAX_S = 0.5  # ... up to this


def new_session_id() -> str:
    return "sess_" + secrets.token_urlsafe(24)  # 192 random bits


def session_not_found(session_id: str) -> APIError:
    return APIError(404, f"session {session_id!r} not found", param="session_id", code="session_not_found")


def store_error(e: StateStoreError, what: str) -> APIError:
    """Map a state-store failure to a client-facing error."""
    if isinstance(e, StoreUnavailable):
        return APIError(
            503,
            f"the session store is unavailable ({what}): retry shortly; stateless completions still work",
            code="store_unavailable",
            headers={"Retry-After": "2"},
        )
    if isinstance(e, LockHeldError):
        return APIError(
            409,
            f"{what}: the session is in use by another request; retry when it has finished",
            code="session_busy",
        )
    if isinstance(e, LockNotHeldError):
        return APIError(
            409,
            f"{what}: the session's lease was lost (the store was unreachable too long); retry",
            code="session_lease_lost",
        )
    if isinstance(e, VersionConflictError):
        return APIError(409, f"{what}: the session changed or already exists", code="session_conflict")
    if isinstance(e, StateCodecError):
        return APIError(
            409, f"{what}: the stored state does not fit the loaded model: {e}", code="state_mismatch"
        )
    return APIError(400, f"{what}: {e}")


@dataclass
class HeldLease:
    """A lease this server holds, and when the store expires it by itself (monotonic seconds)."""

    lease: Lease
    expires_at: float


class SessionService:
    """Lease, load and save sessions for the routes; owns the queue of leases still to release."""

    def __init__(self, states: SessionStates, settings: Settings, state_bytes: Histogram) -> None:
        self.states = states
        self.store = states.store
        self.settings = settings
        self.state_bytes = state_bytes  # sizes of the states loaded
        self.pending: dict[str, HeldLease] = {}  # by lease token: releases that failed (store down)
        self._wake = asyncio.Event()

    @asynccontextmanager
    async def lease(self, tenant: str, session_id: str) -> AsyncIterator[Lease]:
        """`async with service.lease(tenant, sid) as lease:` the session's lease (APIError 409 if
        another request holds it, 503 if the store is down), renewed while held, released on exit
        (queued for a retry if the store cannot be reached then)."""
        ttl = self.settings.session_lock_ttl_s
        t0 = time.monotonic()
        try:
            lease = await self.store.acquire(tenant, session_id, ttl)
        except StateStoreError as e:
            raise store_error(e, f"session {session_id!r}") from None
        held = HeldLease(lease, t0 + ttl)
        renewer = asyncio.get_running_loop().create_task(self._renew(held))
        try:
            yield lease
        finally:
            renewer.cancel()
            await self._release(held)

    async def _renew(self, held: HeldLease) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_renew_interval_s)
            t0 = time.monotonic()
            try:
                await self.store.renew(held.lease)
                held.expires_at = t0 + held.lease.ttl
            except LockNotHeldError:
                log.warning("the lease on session %s was lost (expired or taken over)", held.lease.session)
                return
            except StateStoreError as e:
                log.warning("could not renew the lease on session %s: %s", held.lease.session, e)

    async def _release(self, held: HeldLease) -> None:
        try:
            await self.store.release(held.lease)
        except StoreUnavailable:
            self.pending[held.lease.token] = held  # released by retry_releases once the store is back
            self._wake.set()
        except StateStoreError as e:  # lost to another owner: nothing of ours left to release
            log.info("lease on session %s not released: %s", held.lease.session, e)

    async def flush_releases(self) -> int:
        """Try the queued releases once (stops at the first one the store does not answer); returns
        how many are still queued. Leases past their TTL are dropped: the store expired them."""
        for token, held in list(self.pending.items()):
            if time.monotonic() > held.expires_at:
                del self.pending[token]
                continue
            try:
                await self.store.release(held.lease)
            except StoreUnavailable:
                break
            except StateStoreError:
                pass  # another owner holds it now: ours is gone
            log.info("released the lease on session %s after the store came back", held.lease.session)
            self.pending.pop(token, None)
        return len(self.pending)

    async def retry_releases(self) -> None:
        """Forever (a runtime task): release queued leases, backing off while the store is down."""
        delay = RETRY_MIN_S
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                delay = RETRY_MIN_S
            if await self.flush_releases():
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)

    async def load(self, tenant: str, session_id: str, *, must_exist: bool = True) -> LoadedState | None:
        """The session's state (None if absent; 404 instead when must_exist). Hold its lease."""
        try:
            loaded = await self.states.load(tenant, session_id)
        except StateStoreError as e:
            raise store_error(e, f"loading session {session_id!r}") from None
        if loaded is None:
            if must_exist:
                raise session_not_found(session_id)
            return None
        self.state_bytes.observe(loaded.info.size)
        return loaded

    async def save(
        self,
        tenant: str,
        session_id: str,
        state: RetentionState,
        *,
        lease: Lease | None,
        base: LoadedState | None = None,
        provenance: Provenance | None = None,
        create: bool = False,
        logits: Tensor | None = None,
    ) -> int:
        """Save a session's new state under its lease; `base` is the state it continues (its creation
        time and provenance carry over). create=True: 409 if the session exists. `logits`: the state's
        (V,) next-token logits (a final output's), saved with it so the session can continue without
        new input."""
        meta = base.meta if base is not None else None
        try:
            return await self.states.save(
                tenant,
                session_id,
                state,
                provenance=provenance or (meta.provenance if meta else None),
                created_at=meta.created_at if meta else None,
                ttl=self.settings.session_ttl_s,
                lease=lease,
                expected_version=0 if create else None,
                logits=logits,
            )
        except StateStoreError as e:
            raise store_error(e, f"saving session {session_id!r}") from None

    async def info(self, tenant: str, session_id: str) -> EntryInfo:
        """A session's metadata (no state bytes move); 404 if absent."""
        try:
            info = await self.states.info(tenant, session_id)
        except StateStoreError as e:
            raise store_error(e, f"session {session_id!r}") from None
        if info is None:
            raise session_not_found(session_id)
        return info
