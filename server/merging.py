"""POST /v1/sessions/merge: a new session made from the states of others (model/memory.py).

- `concat`: as if the sources had been read one after another, in the order given (exact in the first
  layer, approximate above it); the new session carries the last source's next-token logits, so it
  can continue without new input.
- `average`: a weighted blend of the sources, each shifted to end at the longest one's position; it
  has no next-token logits (its first request must send a prompt).

Every source, and the new session's id, is leased for the whole merge (in sorted order, so two merges
never wait on each other): no source is read half-written, and a busy source is a 409. The sources
are only read. The merge arithmetic runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from torch import Tensor

from model.memory import average_weights, merge_average, merge_concat
from model.state import RetentionState
from server.errors import APIError
from server.generation import session_exists
from server.protocol import SessionMerge
from server.runtime import Runtime
from server.session_service import new_session_id, store_error
from state_store import Lease, LoadedState, Provenance, StateStoreError


def merge_weights(body: SessionMerge) -> list[float] | None:
    """The weights the merge will use (average: the request's, or uniform; concat: None), checked
    against the mode and sources (APIError 400 saying what to fix)."""
    dupes = sorted({s for s in body.sources if body.sources.count(s) > 1})
    if dupes:
        raise APIError(400, f"sources: {dupes[0]!r} is listed twice; list each session once", param="sources")
    if body.mode == "concat":
        if body.weights is not None:
            raise APIError(400, "weights are for mode 'average'; a concat takes none", param="weights")
        return None
    try:
        return average_weights(body.weights, len(body.sources))
    except ValueError as e:
        raise APIError(400, str(e).removeprefix("merge_average: "), param="weights") from None


def _merge(
    mode: str, loaded: list[LoadedState], weights: list[float] | None
) -> tuple[RetentionState, Tensor | None]:
    """The merged state and its (V,) next-token logits (concat: the last source's; average: none)."""
    states = [x.state for x in loaded]
    if mode == "concat":
        last = loaded[-1].logits
        return merge_concat(states), None if last is None else last[0]
    return merge_average(states, weights), None


async def merge_sessions(rt: Runtime, tenant: str, body: SessionMerge) -> str:
    """Create the merged session; returns its id. 404 for a source the tenant does not have, 409 if
    the new id exists or a source is busy, 400 for weights that do not fit."""
    weights = merge_weights(body)
    new_id = body.session_id or new_session_id()
    if new_id in body.sources:
        raise session_exists(new_id)
    async with AsyncExitStack() as stack:
        leases: dict[str, Lease] = {}
        for sid in sorted({*body.sources, new_id}):
            leases[sid] = await stack.enter_async_context(rt.sessions.lease(tenant, sid))
        try:
            taken = await rt.states.info(tenant, new_id) is not None
        except StateStoreError as e:
            raise store_error(e, f"session {new_id!r}") from None
        if taken:
            raise session_exists(new_id)
        loaded: list[LoadedState] = []
        for sid in body.sources:
            src = await rt.sessions.load(tenant, sid)
            assert src is not None  # must_exist: 404 otherwise
            loaded.append(src)
        try:
            state, logits = await asyncio.to_thread(_merge, body.mode, loaded, weights)
        except ValueError as e:
            raise APIError(400, f"these sessions cannot be merged: {e}", param="sources") from None
        provenance = Provenance(
            merged_from=tuple(body.sources),
            merge_mode=body.mode,
            merge_weights=tuple(weights or ()),
        )
        await rt.sessions.save(
            tenant, new_id, state, lease=leases[new_id], provenance=provenance, create=True, logits=logits
        )
    rt.metrics.merges.labels(mode=body.mode).inc()
    return new_id
