"""One engine request as the HTTP layer runs it; for a session, inside the session's lease.

A `Generation` receives its engine outputs through a callback on the event loop. A session-bound one
runs in a task of the runtime: lease, load, submit, wait for the final output, save, release. A client
that goes away only aborts the request (the engine ends it within one iteration): the task still
receives the final state, saves it (exactly prompt + delivered tokens, the engine's final-state rule)
and releases the lease before the client hears "finished".
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from model.dropping import DropSpec
from server.dropping import dropping_label
from server.engine import EngineOverloaded, EngineRequest, EngineSamplingParams, RequestOutput, TokenLogprob
from server.errors import APIError
from server.runtime import Runtime
from state_store import Lease, LoadedState, Provenance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionTarget:
    """The session a generation reads from and saves to."""

    tenant: str
    session_id: str
    create: bool = False  # a new session: 409 session_exists if it exists; saved only if absent
    provenance: Provenance | None = None  # for a new session (default: the loaded one's)


def session_exists(session_id: str) -> APIError:
    return APIError(
        409,
        f"session {session_id!r} already exists; delete it first or pick another id",
        param="session_id",
        code="session_exists",
    )


class Generation:
    """Submit, stream deltas, and (for a session) save the final state under the session's lease."""

    def __init__(
        self,
        rt: Runtime,
        prompt_ids: list[int],
        params: EngineSamplingParams,
        session: SessionTarget | None = None,
        dropping: DropSpec | None = None,
        text: bool = False,
    ) -> None:
        """An empty `prompt_ids` continues the session from the next-token logits saved with it.
        `text`: the prompt was text, so where it starts a sequence (no session, a new session or one
        that has read nothing) the tokenizer's `prompt_prefix` (BOS, `add_bos_token`) goes before it."""
        self.rt = rt
        self.session = session
        self.text = text
        self.request = EngineRequest(prompt_ids, params, dropping=dropping if prompt_ids else None)
        self.save_error: APIError | None = None
        self._queue: asyncio.Queue[RequestOutput | None] = asyncio.Queue()
        self._final: asyncio.Future[RequestOutput] = asyncio.get_running_loop().create_future()
        self._aborted = False

    async def start(self) -> None:
        """Take the session's lease and load it (if any), then submit. Raises the APIError that kept
        it from starting (409 busy, 404, 503 store or engine overloaded, 400); the lease is released."""
        if self.session is None:
            self._starts_sequence()
            self._submit()
            return
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.rt.spawn(self._run_session(self.session, started))
        try:
            await asyncio.shield(started)
        except asyncio.CancelledError:  # the client left before its request started
            started.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waits for it
            self.abort()
            raise

    def _starts_sequence(self) -> None:
        if self.text and self.request.prompt_ids:
            self.request.prompt_ids = self.rt.tokenizer.prompt_prefix + self.request.prompt_ids

    def _submit(self) -> None:
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

    async def _run_session(self, target: SessionTarget, started: asyncio.Future[None]) -> None:
        svc = self.rt.sessions
        out: RequestOutput | None = None
        try:
            async with svc.lease(target.tenant, target.session_id) as lease:
                loaded = await svc.load(target.tenant, target.session_id, must_exist=not target.create)
                if target.create and loaded is not None:
                    raise session_exists(target.session_id)
                if self._aborted:  # the client left while the session was being loaded
                    started.cancel()
                    return
                self.request.state = loaded.state if loaded is not None else None
                if loaded is None or int(loaded.state.position.max()) == 0:
                    self._starts_sequence()
                if not self.request.prompt_ids:
                    self.request.logits = saved_logits(target.session_id, loaded)
                self._submit()
                started.set_result(None)
                out = await self._final
                if out.state is not None:
                    await self._save(target, out, lease, loaded)
        except APIError as e:
            if not started.done():
                started.set_exception(e)
        except Exception as e:  # pragma: no cover - keep clients from hanging whatever happens
            log.exception("generation %s failed", self.request.request_id)
            if not started.done():
                started.set_exception(e)
        finally:  # after the lease was released: the client may come right back
            if not started.done():  # cancelled: the server is shutting down
                started.set_exception(APIError(503, "the server is shutting down; retry", code="aborted"))
            if out is not None:
                self._queue.put_nowait(out)
            self._queue.put_nowait(None)

    async def _save(
        self, target: SessionTarget, out: RequestOutput, lease: Lease, base: LoadedState | None
    ) -> None:
        """Save the final state; a failure is kept in `save_error` (the client hears it after its tokens)."""
        assert out.state is not None
        provenance = target.provenance or (base.meta.provenance if base is not None else None)
        if self.request.dropping is not None:  # the state was read with dropping: say so
            label = dropping_label(self.request.dropping)
            provenance = dataclasses.replace(provenance or Provenance(), token_dropping=label)
        try:
            await self.rt.sessions.save(
                target.tenant,
                target.session_id,
                out.state,
                lease=lease,
                base=base,
                provenance=provenance,
                create=target.create,
                logits=out.logits,
            )
        except APIError as e:
            self.save_error = e
            log.warning("could not save session %s: %s", target.session_id, e.message)

    def _on_output(self, out: RequestOutput) -> None:
        """Engine outputs, on the event loop: deltas go straight to the consumer's queue; the final one
        to the session task first (it saves the state), when there is a session."""
        if not out.finished:
            self._queue.put_nowait(out)
            return
        self.rt.metrics.request_finished(out)
        if self.session is not None:
            if not self._final.done():
                self._final.set_result(out)
        else:
            self._queue.put_nowait(out)
            self._queue.put_nowait(None)

    def abort(self) -> None:
        self._aborted = True
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
            c.text += out.text
            c.logprobs += out.logprobs or []
            if out.finished:
                c.final = out
        if c.final is None:  # pragma: no cover - the engine ends every request with a finished output
            raise APIError(503, "the engine stopped before finishing the request; retry")
        return c


def saved_logits(session_id: str, loaded: LoadedState | None) -> torch.Tensor:
    """The (V,) next-token logits a session continues from without new input (400 if it has none)."""
    if loaded is None or loaded.logits is None:
        raise APIError(
            400,
            f"session {session_id!r} has no saved next-token logits to continue from (a new or empty"
            " session, an `average` merge, or an imported state saved without them): send a prompt",
            param="prompt",
            code="prompt_required",
        )
    return loaded.logits[0]  # (1, V) -> (V,)


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One delta covering `a` then `b` (b may be the finished one)."""
    lps = None if a.logprobs is None and b.logprobs is None else [*(a.logprobs or []), *(b.logprobs or [])]
    return dataclasses.replace(b, token_ids=a.token_ids + b.token_ids, text=a.text + b.text, logprobs=lps)


@dataclass
class Collected:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    final: RequestOutput | None = None
