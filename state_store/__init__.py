"""Session state store: a versioned safetensors codec for RetentionState, and async stores.

- `StateCodec(config, fingerprint, bounds=state_bounds(model))`: `encode(state, logits=None) -> bytes`,
  `decode(bytes) -> DecodedState` (state, meta, logits); checksummed, bounded, versioned.
- `model_fingerprint(model)`: the config + weights hash a codec checks states against.
- `state_bounds(model)`: how large the model's states and logits can get (the codec refuses more).
- `MemoryStateStore()`: the embedded default (in-process LRU). `RedisStateStore.from_url(url)`:
  Redis or Redis Cluster. Both implement `StateStore` (get / put / delete / exists / list / touch /
  get_info, lease locks, optimistic versions) and count operations in `store.metrics`.
- `SessionStates(store, codec)`: save / load RetentionStates directly.
"""

from state_store.base import EntryInfo, Lease, Page, StateStore, StoredState
from state_store.bounds import StateBounds, StateBoundsError, state_bounds
from state_store.codec import MAX_READ_POSITION, DecodedState, StateCodec, max_abs_error, max_rel_error
from state_store.errors import (
    CorruptStateError,
    InvalidKeyError,
    LockError,
    LockHeldError,
    LockNotHeldError,
    ModelMismatchError,
    StateCodecError,
    StateFormatError,
    StateStoreError,
    StateVersionError,
    StoreUnavailable,
    ValueTooLargeError,
    VersionConflictError,
)
from state_store.fingerprint import config_fingerprint, model_fingerprint
from state_store.header import FORMAT_VERSION, MAX_POSITION, ChecksumError, Provenance, StateMeta
from state_store.memory import MemoryStateStore
from state_store.metrics import StoreMetrics, StoreMetricsCollector
from state_store.redis_store import RedisStateStore
from state_store.sessions import LoadedState, SessionStates

__all__ = [
    "FORMAT_VERSION",
    "MAX_POSITION",
    "MAX_READ_POSITION",
    "ChecksumError",
    "CorruptStateError",
    "DecodedState",
    "EntryInfo",
    "InvalidKeyError",
    "Lease",
    "LoadedState",
    "LockError",
    "LockHeldError",
    "LockNotHeldError",
    "MemoryStateStore",
    "ModelMismatchError",
    "Page",
    "Provenance",
    "RedisStateStore",
    "SessionStates",
    "StateBounds",
    "StateBoundsError",
    "StateCodec",
    "StateCodecError",
    "StateFormatError",
    "StateMeta",
    "StateStore",
    "StateStoreError",
    "StateVersionError",
    "StoreMetrics",
    "StoreMetricsCollector",
    "StoreUnavailable",
    "StoredState",
    "ValueTooLargeError",
    "VersionConflictError",
    "config_fingerprint",
    "max_abs_error",
    "max_rel_error",
    "model_fingerprint",
    "state_bounds",
]
