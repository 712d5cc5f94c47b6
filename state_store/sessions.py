"""SessionStates: typed save / load of RetentionStates on any StateStore, with one model's codec."""

from __future__ import annotations

from dataclasses import dataclass

from model.state import RetentionState
from state_store.base import EntryInfo, Lease, StateStore
from state_store.codec import StateCodec
from state_store.header import Provenance, StateMeta


@dataclass(frozen=True)
class LoadedState:
    state: RetentionState
    meta: StateMeta
    info: EntryInfo  # version (for an optimistic put), size, TTL left


class SessionStates:
    """`save` encodes and puts, `load` gets and decodes (validating it against the codec's model)."""

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
    ) -> int:
        """Encode with the codec's options and store; returns the new version.

        Pass the loaded `meta.created_at` when saving a resumed session, to keep its creation time.
        """
        data = self.codec.encode(state, provenance=provenance, created_at=created_at)
        return await self.store.put(
            namespace, session, data, ttl=ttl, expected_version=expected_version, lease=lease
        )

    async def load(self, namespace: str, session: str) -> LoadedState | None:
        """None if absent; StateCodecError subclasses if the stored bytes do not fit this model."""
        stored = await self.store.get(namespace, session)
        if stored is None:
            return None
        decoded = self.codec.decode(stored.data)
        return LoadedState(decoded.state, decoded.meta, stored.info)

    async def info(self, namespace: str, session: str) -> EntryInfo | None:
        """Metadata only (no state bytes move)."""
        return await self.store.get_info(namespace, session)
