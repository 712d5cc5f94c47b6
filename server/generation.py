"""One engine request as the HTTP layer runs it, with its session's lease, load and save.

A `Generation` receives its engine outputs through a callback on the event loop, and handles the
final one in a task of its own, so a client that goes away only aborts the request (the engine ends
it within one iteration): that task still receives the final state, saves it to the session
(exactly prompt + delivered tokens, the engine's final-state rule) and releases the session's lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import ClassVar

from server.engine import EngineOverloaded, EngineRequest, EngineSamplingParams, RequestOutput, TokenLogprob
from server.errors import APIError
from server.runtime import Runtime
from state_store import (
    Lease,
    LoadedState,
    LockHeldError,
    LockNotHeldError,
    Provenance,
    StateCodecError,
    StateStoreError,
    StoreUnavailable,
    VersionConflictError,
)

log = logging.getLogger(__name__)


def new_session_id() -> str:
    return "sess_" + secrets.token_urlsafe(24)  # 192 random bits


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
class SessionHandle:
    """A session held by one request: its lease and loaded state (None for a new session)."""

    tenant: str
    session_id: str
    lease: Lease | None
    loaded: LoadedState | None
    provenance: Provenance | None = None


async def take_lease(rt: Runtime, tenant: str, session_id: str) -> Lease:
    """The session's lease (409 if another request holds it, 503 if the store is down)."""
    try:
        return await rt.store.acquire(tenant, session_id, rt.settings.session_lock_ttl_s)
    except StateStoreError as e:
        raise store_error(e, f"session {session_id!r}") from None


async def open_session(
    rt: Runtime, tenant: str, session_id: str, *, must_exist: bool = True
) -> SessionHandle:
    """Take the session's lease (409 if held) and load its state (404 if absent and must_exist)."""
    lease = await take_lease(rt, tenant, session_id)
    try:
        loaded = await rt.sessions.load(tenant, session_id)
    except StateStoreError as e:
        await release(rt, lease)
        raise store_error(e, f"loading session {session_id!r}") from None
    if loaded is None and must_exist:
        await release(rt, lease)
        raise APIError(404, f"session {session_id!r} not found", param="session_id", code="session_not_found")
    if loaded is not None:
        rt.metrics.state_bytes.observe(loaded.info.size)
    return SessionHandle(tenant, session_id, lease, loaded)


async def release(rt: Runtime, lease: Lease | None) -> None:
    if lease is None:
        return
    with contextlib.suppress(StateStoreError):
        await rt.store.release(lease)


async def save_state(rt: Runtime, h: SessionHandle, state, *, create: bool = False) -> int:
    """Save a session's new state under its lease (create=True: fail with 409 if it exists)."""
    meta = h.loaded.meta if h.loaded is not None else None
    try:
        version = await rt.sessions.save(
            h.tenant,
            h.session_id,
            state,
            provenance=h.provenance or (meta.provenance if meta else None),
            created_at=meta.created_at if meta else None,
            ttl=rt.settings.session_ttl_s,
            lease=h.lease,
            expected_version=0 if create else None,
        )
    except StateStoreError as e:
        raise store_error(e, f"saving session {h.session_id!r}") from None
    return version


class Generation:
    """Submit, stream deltas, and (for a session) save the final state and release the lease."""

    _tasks: ClassVar[set[asyncio.Task]] = set()  # strong references to running generations

    def __init__(
        self,
        rt: Runtime,
        prompt_ids: list[int],
        params: EngineSamplingParams,
        session: SessionHandle | None = None,
        create: bool = False,
    ) -> None:
        self.rt = rt
        self.session = session
        self.create = create
        state = session.loaded.state if session is not None and session.loaded is not None else None
        self.request = EngineRequest(prompt_ids, params, state)
        self._queue: asyncio.Queue[RequestOutput | None] = asyncio.Queue()
        self.save_error: APIError | None = None
        self._keeper: asyncio.Task | None = None  # renews the session's lease while the request runs

    def start(self) -> None:
        """Submit to the engine (raises APIError 503/400); on failure the session lease is released."""
        try:
            try:
                self.rt.engine.submit(self.request, sink=self._on_output)
            except EngineOverloaded as e:
                raise APIError(
                    503,
                    f"the server is overloaded ({e}); retry shortly",
                    code="overloaded",
                    headers={"Retry-After": "1"},
                ) from None
            except ValueError as e:
                raise APIError(400, str(e)) from None
        except APIError:
            if self.session is not None:
                self._track(asyncio.get_running_loop().create_task(release(self.rt, self.session.lease)))
            raise
        if self.session is not None and self.session.lease is not None:
            self._keeper = asyncio.get_running_loop().create_task(self._keep_lease(self.session.lease))

    @classmethod
    def _track(cls, task: asyncio.Task) -> asyncio.Task:
        cls._tasks.add(task)
        task.add_done_callback(cls._tasks.discard)
        return task

    @classmethod
    async def wait_all(cls, timeout: float) -> None:
        """Wait for running generations to save their sessions (server shutdown)."""
        if cls._tasks:
            await asyncio.wait(list(cls._tasks), timeout=timeout)

    def _on_output(self, out: RequestOutput) -> None:
        """Engine outputs, on the event loop: deltas go straight to the consumer's queue; the final
        one first goes through `_finish` (its own task, so it runs even when nobody consumes)."""
        if not out.finished:
            self._queue.put_nowait(out)
            return
        self._track(asyncio.get_running_loop().create_task(self._finish(out)))

    async def _finish(self, out: RequestOutput) -> None:
        try:
            self.rt.metrics.request_finished(out)
            if self._keeper is not None:
                self._keeper.cancel()
            if self.session is not None and out.state is not None:
                await self._save(out)
        except Exception:  # pragma: no cover - keep clients from hanging whatever happens
            log.exception("finishing generation %s failed", self.request.request_id)
        finally:
            await self._release()  # before the client hears "finished" and comes back
            self._queue.put_nowait(out)
            self._queue.put_nowait(None)

    async def _release(self) -> None:
        if self.session is not None and self.session.lease is not None:
            lease, self.session.lease = self.session.lease, None
            await release(self.rt, lease)

    async def _save(self, out: RequestOutput) -> None:
        assert self.session is not None
        try:
            await save_state(self.rt, self.session, out.state, create=self.create)
        except APIError as e:
            self.save_error = e
            log.warning("could not save session %s: %s", self.session.session_id, e.message)

    async def _keep_lease(self, lease: Lease) -> None:
        ttl = lease.ttl
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                lease = await self.rt.store.renew(lease)
                if self.session is None or self.session.lease is None:
                    return
                self.session.lease = lease
            except StateStoreError as e:
                log.warning("could not renew the lease on %s: %s", lease.session, e)

    def abort(self) -> None:
        self.rt.engine.abort(self.request.request_id)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Every delta, the finished one last (after the session was saved). Deltas already waiting
        are merged into one: fewer, larger SSE chunks when a client or the event loop falls behind."""
        while (out := await self._queue.get()) is not None:
            while not out.finished and not self._queue.empty():
                nxt = self._queue.get_nowait()
                assert nxt is not None, "the end marker only ever follows the finished output"
                out = merge_outputs(out, nxt)
            yield out

    async def result(self) -> Collected:
        """Wait for the whole completion (non-streaming responses)."""
        c = Collected()
        async for out in self.outputs():
            c.token_ids += out.token_ids
            c.text += out.text
            c.logprobs += out.logprobs or []
            if out.finished:
                c.final = out
        if c.final is None:  # pragma: no cover - the engine ends every request with a finished output
            raise APIError(503, "the engine stopped before finishing the request; retry")
        return c


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One delta covering `a` then `b` (b may be the finished one)."""
    lps = None if a.logprobs is None and b.logprobs is None else [*(a.logprobs or []), *(b.logprobs or [])]
    return dataclasses.replace(b, token_ids=a.token_ids + b.token_ids, text=a.text + b.text, logprobs=lps)


@dataclass
class Collected:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    final: RequestOutput | None = None
