"""What a session's memory looks like (GET /v1/sessions/{id}/stats): tokens read, the state's size,
and the norm of every (layer, head) state matrix, for the playground's memory view.

The state is a fixed size whatever the session has read; its norms show where the memory is used.
The norms are computed in a worker thread (one torch thread), off the event loop: a large model's
state is hundreds of megabytes.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

import torch
from pydantic import BaseModel, Field

from model.state import RetentionState
from state_store import LoadedState


class SessionStats(BaseModel):
    """The memory of one session (the fields after `state_norms` are extras for the playground)."""

    object: str = "session.stats"
    id: str
    tokens: int = Field(description="tokens the session has read (its state's position)")
    state_bytes: int = Field(description="bytes of the recurrent state in memory: fixed, whatever `tokens`")
    num_layers: int
    num_heads: int
    state_norms: list[list[float]] = Field(
        description="Frobenius norm of each head's (key dim x value dim) state matrix, per layer"
    )
    stored_bytes: int = Field(description="bytes of the stored blob (state, header, next-token logits)")
    state_shape: list[int] = Field(description="one layer's state: [heads, key dim, value dim]")
    dtype: str = Field(description="the stored state's dtype")
    version: int = Field(description="the session's version (bumped by every save)")


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        1, thread_name_prefix="retserve-stats", initializer=torch.set_num_threads, initargs=(1,)
    )


def state_norms(state: RetentionState) -> list[list[float]]:
    """Per layer, per head: the Frobenius norm of row 0's state matrix (float64 accumulation)."""
    assert state.batch_size == 1, "a session state has one row"
    return [
        torch.linalg.matrix_norm(layer[0].double(), ord="fro").tolist()  # (H, Dk, Dv) -> (H,)
        for layer in state.layers
    ]


async def session_stats(session_id: str, loaded: LoadedState) -> SessionStats:
    state = loaded.state
    norms = await asyncio.get_running_loop().run_in_executor(_pool(), state_norms, state)
    _, heads, dk, dv = state.layers[0].shape
    return SessionStats(
        id=session_id,
        tokens=int(state.position[0]),
        state_bytes=state.nbytes,
        num_layers=len(state.layers),
        num_heads=heads,
        state_norms=norms,
        stored_bytes=loaded.info.size,
        state_shape=[heads, dk, dv],
        dtype=loaded.meta.dtype,
        version=loaded.info.version,
    )
