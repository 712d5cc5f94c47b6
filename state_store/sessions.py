"""SessionStates: typed save / load of RetentionStates on any StateStore, with one model's codec."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from model.state import RetentionState
from state_store.base import EntryInfo, Lease, StateStore
from state_store.codec import DecodedState, StateCodec
from state_store.header import Provenance, StateMeta


@functools.cache
def _codec_pool() -> ThreadPoolExecutor:
    """Worker threads for encoding / decoding, each with one torch thread: a second multi-threaded
    OpenMP team in the process slows the engine's (see server/engine/types.py, num_threads)."""
    return ThreadPoolExecutor(
        2, thread_name_prefix="retserve-codec", initializer=torch.set_num_threads, initargs=(1,)
    )


@dataclass(frozen=True)
class LoadedState:
    state: RetentionState
    meta: StateMeta
    info: EntryInfo  # version (for an optimistic put), size, TTL left
    logits: Tensor | None = None  # (B, V) float32 next-token logits saved with the state, or None


class SessionStates:
    """`save` encodes and puts, `load` gets and decodes (validating it against the codec's model);
    encoding and decoding run in a worker thread so a large state does not stall the event loop."""

    def __init__(self, store: StateStore, codec: StateCodec) -> None:
        self.store = store
        self.codec = codec

    async def save(
        self,
        namespace: str,
        session: str,
        state: RetentionState,
        *,
        provenance: Provenance | None = None,
        created_at: float | None = None,
        ttl: float | None = None,
        expected_version: int | None = None,
        lease: Lease | None = None,
        logits: Tensor | None = None,
    ) -> int:
        """Encode with the codec's options and store; returns the new version.

        Pass the loaded `meta.created_at` when saving a resumed session, to keep its creation time.
        `logits`: the next-token logits after the state's last token ((B, V) or (V,)), saved with it.
        """
        # encoding copies every tensor byte (~100 MB for a 1.3B model's state): off the event loop
        encode = functools.partial(
            self.codec.encode, state, provenance=provenance, created_at=created_at, logits=logits
        )
        data = await asyncio.get_running_loop().run_in_executor(_codec_pool(), encode)
        return await self.store.put(
            namespace, session, data, ttl=ttl, expected_version=expected_version, lease=lease
        )

    async def load(self, namespace: str, session: str) -> LoadedState | None:
        """None if absent; StateCodecError subclasses if the stored bytes do not fit this model."""
        stored = await self.store.get(namespace, session)
        if stored is None:
            return None
        decoded = await self.decode(stored.data)
        return LoadedState(decoded.state, decoded.meta, stored.info, decoded.logits)

    async def decode(self, data: bytes) -> DecodedState:
        """Validate and decode a blob (e.g. an uploaded one) in a codec worker thread."""
        return await asyncio.get_running_loop().run_in_executor(_codec_pool(), self.codec.decode, data)

    async def info(self, namespace: str, session: str) -> EntryInfo | None:
        """Metadata only (no state bytes move)."""
        return await self.store.get_info(namespace, session)
