"""RetentionState <-> bytes: a safetensors file with a versioned header. Never pickle.

Layout (format version 1): tensors `layers.{i}` (B, H, head_k_dim, head_v_dim) in the storage dtype and
`position` (B,) int64; the safetensors metadata key `retserve` holds the `StateMeta` JSON. With
compression "zlib", the layers are instead one uint8 tensor `layers.zlib`: the layer bytes concatenated,
byte-shuffled (byte k of every element together, which groups the exponent bytes) and zlib-compressed.

Storage in float32 (float64 for float64 states) is exact; bfloat16 / float16 are lossy and opt-in:
every value is within its format's rounding error (2^-8 / 2^-11 relative); on a real `small` state
that is a max error of 2.8e-3 / 3.6e-4 relative to the layer's largest value, and 3.3e-3 / 4.8e-4 on
the next token's logits. zlib compression is exact but costs more CPU than it saves on a local or
LAN Redis (figures in docs/benchmarks.md), so it is off by default.
Decoding validates the framing, the header, the fingerprint, every shape and dtype against the model's
config, the positions and finiteness, and raises a `StateCodecError` subclass saying what is wrong.
"""

from __future__ import annotations

import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import Tensor

from model.config import RetNetConfig
from model.state import RetentionState, StateMismatchError
from state_store.errors import CorruptStateError, ModelMismatchError, StateCodecError
from state_store.fingerprint import check_fingerprint
from state_store.header import (
    COMPRESSIONS,
    META_KEY,
    STORAGE_DTYPES,
    Frame,
    Provenance,
    StateMeta,
    read_meta,
)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_FP16_MAX = 65504.0
DEFAULT_MAX_BATCH = 4096

if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
    raise ImportError("state_store's codec needs a little-endian machine")


@dataclass(frozen=True)
class DecodedState:
    state: RetentionState
    meta: StateMeta


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _shuffle(raw: np.ndarray, itemsize: int) -> bytes:
    return raw.reshape(-1, itemsize).T.tobytes()


def _unshuffle(raw: bytes, itemsize: int) -> np.ndarray:
    return np.frombuffer(raw, np.uint8).reshape(itemsize, -1).T.copy().reshape(-1)


def _config_diff(a: dict[str, int], b: dict[str, int]) -> str:
    keys = sorted(set(a) | set(b))
    diffs = [f"{k} {a.get(k)} vs {b.get(k)}" for k in keys if a.get(k) != b.get(k)]
    return ", ".join(diffs)


class StateCodec:
    """Encodes and decodes the states of one loaded model (its config and fingerprint).

    - `storage_dtype`: None keeps the state's own dtype (exact); "bfloat16" or "float16" store lossy
      copies (half the bytes; decoded states come back in the original dtype).
    - `compression`: "none" (default) or "zlib" (byte-shuffle + zlib at `compression_level`).
    - `max_batch`: decoding refuses states with more rows (bounds memory on hostile input).
    """

    def __init__(
        self,
        config: RetNetConfig,
        fingerprint: str,
        *,
        storage_dtype: str | None = None,
        compression: str = "none",
        compression_level: int = 1,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if not isinstance(config, RetNetConfig):
            raise TypeError(f"config must be a RetNetConfig, got {type(config).__name__}")
        try:
            check_fingerprint(fingerprint)
        except ValueError as e:
            raise ValueError(
                f"fingerprint: {e}; compute it with state_store.model_fingerprint(model)"
            ) from None
        self.config = config
        self.fingerprint = fingerprint
        self._config_dict = config.fingerprint_dict()
        self.storage_dtype = self._check_storage(storage_dtype)
        self.compression = self._check_compression(compression)
        if not 0 <= compression_level <= 9:
            raise ValueError(f"compression_level must be 0..9 (zlib), got {compression_level}")
        self.compression_level = compression_level
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch

    @staticmethod
    def _check_storage(storage_dtype: str | None) -> str | None:
        if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype must be None or one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}"
            )
        return storage_dtype

    @staticmethod
    def _check_compression(compression: str) -> str:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {list(COMPRESSIONS)}, got {compression!r}")
        return compression

    # ---- encode -----------------------------------------------------------------------------
    def encode(
        self,
        state: RetentionState,
        *,
        provenance: Provenance | None = None,
        created_at: float | None = None,
        updated_at: float | None = None,
        storage_dtype: str | None = None,
        compression: str | None = None,
    ) -> bytes:
        """The state as bytes. `created_at` defaults to now (pass the old value when updating)."""
        if not isinstance(state, RetentionState):
            raise TypeError(f"encode takes a RetentionState, got {type(state).__name__}")
        try:
            state.check(self.config)
        except StateMismatchError as e:
            raise ModelMismatchError(f"cannot encode: {e}") from None
        state_dtype = _dtype_name(state.dtype)
        if state_dtype not in ("float32", "float64"):
            raise StateCodecError(
                f"states are float32 or float64, got {state_dtype}; convert with state.to()"
            )
        storage = self._check_storage(storage_dtype) or self.storage_dtype or state_dtype
        comp = self._check_compression(compression) if compression is not None else self.compression
        layers = [t.detach().to("cpu") for t in state.layers]
        for i, t in enumerate(layers):
            if not bool(torch.isfinite(t).all()):
                raise CorruptStateError(f"cannot encode: layer {i} of the state has NaN or infinite values")
            if storage == "float16" and float(t.abs().max()) > _FP16_MAX:
                raise StateCodecError(
                    f"cannot encode in float16: layer {i} has values beyond ±{_FP16_MAX:g};"
                    " use storage_dtype='bfloat16' (same size, float32's range)"
                )
        position = state.position.detach().to("cpu", torch.long).contiguous()
        if bool((position < 0).any()):
            raise CorruptStateError("cannot encode: a row has a negative position")
        now = time.time()
        meta = StateMeta(
            fingerprint=self.fingerprint,
            config=self._config_dict,
            dtype=storage,
            state_dtype=state_dtype,
            positions=tuple(int(p) for p in position.tolist()),
            created_at=now if created_at is None else float(created_at),
            updated_at=now if updated_at is None else float(updated_at),
            provenance=provenance or Provenance(),
            compression=comp,
        )
        sdt = TORCH_DTYPES[storage]
        stored = [t.to(sdt).contiguous() for t in layers]
        tensors: dict[str, Tensor] = {"position": position}
        if comp == "zlib":
            itemsize = stored[0].element_size()
            raw = np.concatenate([t.reshape(-1).view(torch.uint8).numpy() for t in stored])
            blob = zlib.compress(_shuffle(raw, itemsize), self.compression_level)
            tensors["layers.zlib"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        else:
            tensors.update({f"layers.{i}": t for i, t in enumerate(stored)})
        return st_save(tensors, metadata={META_KEY: meta.dumps(), "format": "pt"})

    # ---- decode -----------------------------------------------------------------------------
    def read_meta(self, data: bytes | bytearray | memoryview) -> StateMeta:
        """The header of an encoded state, checked against this model (no tensor is decoded)."""
        meta, _ = self._meta_and_frame(data)
        return meta

    def _meta_and_frame(self, data: bytes | bytearray | memoryview) -> tuple[StateMeta, Frame]:
        meta, frame = read_meta(data)
        if meta.config != self._config_dict:
            raise ModelMismatchError(
                "the state belongs to a model of another shape "
                f"({_config_diff(meta.config, self._config_dict)} (state vs loaded model));"
                " resume it on the model that made it"
            )
        if meta.fingerprint != self.fingerprint:
            raise ModelMismatchError(
                f"the state was made by model {meta.fingerprint}, the loaded model is {self.fingerprint}"
                " (same shapes, other weights); resume it on the model that made it"
            )
        if meta.batch_size > self.max_batch:
            raise CorruptStateError(
                f"the state has {meta.batch_size} rows, more than max_batch={self.max_batch}"
            )
        return meta, frame

    def decode(self, data: bytes | bytearray | memoryview) -> DecodedState:
        """Validate and decode; raises a StateCodecError subclass, never anything else on bad input."""
        meta, frame = self._meta_and_frame(data)
        buf = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        B = meta.batch_size
        cfg = self.config
        shape = cfg.state_shape(B)
        code = STORAGE_DTYPES[meta.dtype]
        layer_names = (
            ["layers.zlib"]
            if meta.compression == "zlib"
            else [f"layers.{i}" for i in range(cfg.num_hidden_layers)]
        )
        want = {"position", *layer_names}
        if set(frame.tensors) != want:
            raise CorruptStateError(
                f"the state's tensors {sorted(frame.tensors)} are not the expected {sorted(want)}"
            )
        pos_e = frame.tensors["position"]
        if pos_e.dtype != "I64" or pos_e.shape != (B,):
            raise CorruptStateError(
                f"position must be int64 of shape ({B},), got {pos_e.dtype} {pos_e.shape}"
            )
        position = self._tensor(buf, frame, "position", torch.int64)
        if position.tolist() != list(meta.positions):
            raise CorruptStateError("the position tensor disagrees with the positions in the header")
        sdt = TORCH_DTYPES[meta.dtype]
        out_dt = TORCH_DTYPES[meta.state_dtype]
        if meta.compression == "zlib":
            layers = self._zlib_layers(buf, frame, sdt, shape)
        else:
            layers = []
            for i in range(cfg.num_hidden_layers):
                e = frame.tensors[f"layers.{i}"]
                if e.dtype != code or e.shape != shape:
                    raise CorruptStateError(
                        f"layer {i} is {e.dtype} {e.shape}; this model's states are {code} {shape}"
                    )
                layers.append(self._tensor(buf, frame, e.name, sdt).reshape(shape))
        for i, t in enumerate(layers):
            if not bool(torch.isfinite(t).all()):
                raise CorruptStateError(f"layer {i} of the state has NaN or infinite values")
        layers = [t.to(out_dt) for t in layers]
        try:
            state = RetentionState(layers, position, cfg)
        except StateMismatchError as e:  # pragma: no cover - checked above
            raise CorruptStateError(str(e)) from None
        return DecodedState(state, meta)

    @staticmethod
    def _tensor(buf: bytes | memoryview, frame: Frame, name: str, dtype: torch.dtype) -> Tensor:
        e = frame.tensors[name]
        raw = np.frombuffer(buf, np.uint8, count=e.end - e.begin, offset=frame.data_start + e.begin).copy()
        return torch.from_numpy(raw).view(dtype).reshape(e.shape)

    def _zlib_layers(
        self, buf: bytes | memoryview, frame: Frame, sdt: torch.dtype, shape: tuple[int, ...]
    ) -> list[Tensor]:
        e = frame.tensors["layers.zlib"]
        if e.dtype != "U8" or len(e.shape) != 1:
            raise CorruptStateError("layers.zlib must be a 1-D uint8 tensor")
        itemsize = torch.empty((), dtype=sdt).element_size()
        per_layer = int(np.prod(shape)) * itemsize
        expected = per_layer * self.config.num_hidden_layers
        blob = bytes(buf[frame.data_start + e.begin : frame.data_start + e.end])
        d = zlib.decompressobj()
        try:
            raw = d.decompress(blob, expected + 1)  # bounded: a zip bomb cannot grow past this
        except zlib.error as err:
            raise CorruptStateError(f"the compressed layers are not valid zlib data ({err})") from None
        if len(raw) != expected or not d.eof or d.unconsumed_tail or d.unused_data:
            raise CorruptStateError(
                f"the compressed layers hold {len(raw)}{'+' if len(raw) > expected else ''} bytes"
                f" (complete: {d.eof}); this model's states need exactly {expected}"
            )
        flat = torch.from_numpy(_unshuffle(raw, itemsize)).view(sdt)
        return [
            flat[i * (per_layer // itemsize) : (i + 1) * (per_layer // itemsize)].reshape(shape)
            for i in range(self.config.num_hidden_layers)
        ]


def max_abs_error(a: RetentionState, b: RetentionState) -> float:
    """Largest absolute difference between two states' layers (for the lossy options' error)."""
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a.layers, b.layers, strict=True))


def max_rel_error(a: RetentionState, b: RetentionState) -> float:
    """Largest |a - b| over layers, relative to the largest |a| of that layer."""
    return max(
        float((x.double() - y.double()).abs().max() / x.double().abs().max().clamp_min(1e-30))
        for x, y in zip(a.layers, b.layers, strict=True)
    )
