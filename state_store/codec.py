"""RetentionState <-> bytes: a safetensors file with a versioned header. Never pickle.

Layout (format version 2): tensors `layers.{i}` (B, H, head_k_dim, head_v_dim) in the storage dtype,
`position` (B,) int64 and, when saved, `logits` (B, vocab_size) float32 (the next-token logits: what
the model gave after the last token the state read; always float32, whatever the storage dtype); the
safetensors metadata key `retserve` holds the `StateMeta` JSON and `retserve_crc32` a CRC-32 of the
whole blob (state_store/header.py). With compression "zlib", the layers are instead one uint8 tensor
`layers.zlib`: the layer bytes concatenated, byte-shuffled (byte k of every element together, which
groups the exponent bytes) and zlib-compressed.

Storage in float32 (float64 for float64 states) is exact; bfloat16 / float16 are lossy and opt-in:
every value is within its format's rounding error (2^-8 / 2^-11 relative); on a real `small` state
that is a max error of 2.8e-3 / 3.6e-4 relative to the layer's largest value, and 3.3e-3 / 4.8e-4 on
the next token's logits. zlib compression is exact but costs more CPU than it saves on a local or
LAN Redis (figures in docs/benchmarks.md), so it is off by default.
Decoding validates the framing, the checksum, the header, the fingerprint, every shape and dtype
against the model's config, the positions, finiteness and, given the model's
`StateBounds` (state_store/bounds.py), the magnitude of every head's state and of the logits, and
raises a `StateCodecError` subclass saying what is wrong. Encoding refuses the same things, so a blob
the codec writes is one it reads back, and a state it accepts can always be saved again.
Positions: written if 0 <= p < 2^53 (`MAX_POSITION`), read if 0 <= p < 2^52 (`MAX_READ_POSITION`):
a state read at the limit can read 2^52 (4.5e15) more tokens and still be saved. (Only a session that
read over 2^52 tokens writes a blob this codec will not read back.)

Version 1 blobs (before the checksum and logits) are still decoded, with every other check; a
version 2 blob without its checksum is refused. Encoding always writes version 2.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.config import RetNetConfig
from model.state import RetentionState, StateMismatchError
from state_store.bounds import StateBounds
from state_store.errors import CorruptStateError, ModelMismatchError, StateCodecError
from state_store.fingerprint import check_fingerprint
from state_store.header import (
    CHECKSUM_KEY,
    CHECKSUM_PLACEHOLDER,
    COMPRESSIONS,
    MAX_POSITION,
    META_KEY,
    STORAGE_DTYPES,
    Frame,
    Provenance,
    StateMeta,
    read_meta,
    seal_parts,
)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_FP16_MAX = 65504.0
_ST_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.uint8: "U8",
}
DEFAULT_MAX_BATCH = 4096
MAX_READ_POSITION = 2**52  # decode refuses positions >= this; encode allows up to MAX_POSITION = 2^53

if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
    raise ImportError("state_store's codec needs a little-endian machine")


@dataclass(frozen=True)
class DecodedState:
    state: RetentionState
    meta: StateMeta
    logits: Tensor | None = None  # (B, V) float32 next-token logits; None when the blob has none


def _serialize(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of CPU `tensors` with a checksum: the tensor bytes are read once for the
    CRC and copied once into the result (safetensors' own `save` plus a sealing pass copied twice)."""
    header: dict[str, object] = {"__metadata__": {**metadata, CHECKSUM_KEY: CHECKSUM_PLACEHOLDER}}
    payload: list[memoryview] = []
    offset = 0
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()  # the tensor's bytes, not a copy
        header[name] = {
            "dtype": _ST_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + raw.nbytes],
        }
        offset += raw.nbytes
        payload.append(memoryview(raw))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # tensor data 8-byte aligned, as safetensors writes it
    return seal_parts(struct.pack("<Q", len(text)) + text, payload)


def all_finite(t: Tensor) -> bool:
    """Every value finite. NaN propagates through aminmax, so both ends finite <=> all finite; one
    reduction, ~8x faster than isfinite().all() (which dominated encoding a large state)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


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
    - `bounds`: `state_bounds(model)`; states and logits beyond them are refused (encode and decode).
      Without bounds only finiteness is checked.
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
        bounds: StateBounds | None = None,
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
        if bounds is not None:
            if not isinstance(bounds, StateBounds):
                raise TypeError(
                    f"bounds must be a StateBounds (state_bounds(model)), got {type(bounds).__name__}"
                )
            bounds.check_config(config)
        self.bounds = bounds

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
        logits: Tensor | None = None,
    ) -> bytes:
        """The state as bytes. `created_at` defaults to now (pass the old value when updating).

        `logits`: the next-token logits after the last token the state read, (B, vocab_size) (or
        (vocab_size,) for a one-row state), any float dtype; stored as float32.
        """
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
        position = state.position.detach().to("cpu", torch.long).contiguous()
        self._check_positions(position, MAX_POSITION, "cannot encode")
        logits32 = None if logits is None else self._encode_logits(logits, state.batch_size)
        sdt = TORCH_DTYPES[storage]
        stored = []
        for i, t in enumerate(state.layers):
            t = t.detach().to("cpu")
            if not all_finite(t):
                raise CorruptStateError(f"cannot encode: layer {i} of the state has NaN or infinite values")
            if storage == "float16" and float(t.abs().max()) > _FP16_MAX:
                raise StateCodecError(
                    f"cannot encode in float16: layer {i} has values beyond ±{_FP16_MAX:g};"
                    " use storage_dtype='bfloat16' (same size, float32's range)"
                )
            t = t.to(sdt).contiguous()
            if self.bounds is not None:  # on the stored values: what decode will check
                self.bounds.check_layer(i, t, "cannot encode")
            stored.append(t)
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
            logits=logits32 is not None,
        )
        tensors: dict[str, Tensor] = {"position": position}
        if logits32 is not None:
            tensors["logits"] = logits32
        if comp == "zlib":
            itemsize = stored[0].element_size()
            raw = np.concatenate([t.reshape(-1).view(torch.uint8).numpy() for t in stored])
            blob = zlib.compress(_shuffle(raw, itemsize), self.compression_level)
            tensors["layers.zlib"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        else:
            tensors.update({f"layers.{i}": t for i, t in enumerate(stored)})
        return _serialize(tensors, {META_KEY: meta.dumps(), "format": "pt"})

    @staticmethod
    def _check_positions(position: Tensor, limit: int, what: str) -> None:
        bad = (position < 0) | (position >= limit)  # (B,)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise CorruptStateError(
                f"{what}: row {row} has position {int(position[row])}, outside 0 <= position"
                f" < 2^{limit.bit_length() - 1} ({limit}; states are read up to 2^52 and written up to"
                " 2^53, so a state read can always be saved again)"
            )

    def _encode_logits(self, logits: Tensor, batch: int) -> Tensor:
        """Validate next-token logits for a `batch`-row state; (B, V) float32 on the CPU."""
        if not isinstance(logits, Tensor):
            raise TypeError(f"logits must be a torch.Tensor or None, got {type(logits).__name__}")
        V = self.config.vocab_size
        if logits.ndim == 1 and batch == 1:
            logits = logits[None]  # (V,) -> (1, V)
        if tuple(logits.shape) != (batch, V):
            raise StateCodecError(
                f"cannot encode: logits have shape {tuple(logits.shape)}; this state needs ({batch}, {V})"
                f" (rows, vocab_size){' or (' + str(V) + ',)' if batch == 1 else ''}"
            )
        if not logits.is_floating_point():
            raise StateCodecError(f"cannot encode: logits must be floating point, got {logits.dtype}")
        out = logits.detach().to("cpu", torch.float32).contiguous()  # (B, V)
        self._check_logits(out, "cannot encode")
        return out

    def _check_logits(self, logits: Tensor, what: str) -> None:
        finite = torch.isfinite(logits).all(-1)  # (B,): logits are small, and the row is named
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            raise CorruptStateError(f"{what}: row {row} of the logits has NaN or infinite values")
        if self.bounds is not None:
            self.bounds.check_logits(logits, f"{what}: logits")

    # ---- decode -----------------------------------------------------------------------------
    def read_meta(self, data: bytes | bytearray | memoryview, *, verify_checksum: bool = False) -> StateMeta:
        """The header of an encoded state, checked against this model (no tensor is decoded; the
        checksum, one pass over every byte, only with `verify_checksum`)."""
        meta, _ = self._meta_and_frame(data, verify_checksum)
        return meta

    def _meta_and_frame(
        self, data: bytes | bytearray | memoryview, verify_checksum: bool
    ) -> tuple[StateMeta, Frame]:
        meta, frame = read_meta(data, verify_checksum=verify_checksum)
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
        meta, frame = self._meta_and_frame(data, True)
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
        want = {"position", *layer_names, *(["logits"] if meta.logits else [])}
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
        self._check_positions(position, MAX_READ_POSITION, "the state")
        logits = self._decode_logits(buf, frame, B) if meta.logits else None
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
            if not all_finite(t):
                raise CorruptStateError(f"layer {i} of the state has NaN or infinite values")
            if self.bounds is not None:
                self.bounds.check_layer(i, t, "the state")
        layers = [t.to(out_dt) for t in layers]
        try:
            state = RetentionState(layers, position, cfg)
        except StateMismatchError as e:  # pragma: no cover - checked above
            raise CorruptStateError(str(e)) from None
        return DecodedState(state, meta, logits)

    def _decode_logits(self, buf: bytes | memoryview, frame: Frame, batch: int) -> Tensor:
        e = frame.tensors["logits"]
        want = (batch, self.config.vocab_size)
        if e.dtype != "F32" or e.shape != want:
            raise CorruptStateError(f"logits are {e.dtype} {e.shape}; this model's are F32 {want}")
        logits = self._tensor(buf, frame, "logits", torch.float32)  # (B, V)
        self._check_logits(logits, "the state")
        return logits

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
