"""The encoded state's framing: a safetensors file whose metadata holds a versioned `StateMeta`.

This module parses and validates the framing of untrusted bytes without touching tensor data:
the 8-byte header length, the JSON header, every tensor entry (dtype, shape, offsets that tile the
data buffer exactly) and the `retserve` metadata record. Nothing here can execute code: JSON is the
only parser involved, and every size is checked against the actual length of the input.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from state_store.errors import CorruptStateError, StateFormatError, StateVersionError
from state_store.fingerprint import check_fingerprint

FORMAT_NAME = "retserve-state"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
META_KEY = "retserve"
MAX_HEADER_BYTES = 1 << 20  # the JSON header; a state's has a few hundred bytes + provenance
MAX_MERGED_FROM = 1024
MAX_LABEL_CHARS = 512

# safetensors dtype codes this format uses, with their item sizes.
DTYPE_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "U8": 1}
STORAGE_DTYPES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16"}
STATE_DTYPES = ("float32", "float64")
COMPRESSIONS = ("none", "zlib")


@dataclass(frozen=True)
class Provenance:
    """Where a state came from. Free of tensor data; stored in the header."""

    primed_from: str | None = None  # digest of the text a primed-document state was made from
    merged_from: tuple[str, ...] = ()  # sessions whose states were merged into this one
    token_dropping: str | None = None  # token-dropping policy used while reading (None = none)

    def __post_init__(self) -> None:
        for name in ("primed_from", "token_dropping"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not 0 < len(v) <= MAX_LABEL_CHARS):
                raise ValueError(f"provenance {name} must be None or a string of 1..{MAX_LABEL_CHARS} chars")
        if not isinstance(self.merged_from, tuple) or len(self.merged_from) > MAX_MERGED_FROM:
            raise ValueError(f"provenance merged_from must be a tuple of at most {MAX_MERGED_FROM} ids")
        for s in self.merged_from:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_LABEL_CHARS:
                raise ValueError(f"provenance merged_from entries must be strings of 1..{MAX_LABEL_CHARS}")

    def to_json(self) -> dict[str, Any]:
        return {
            "primed_from": self.primed_from,
            "merged_from": list(self.merged_from),
            "token_dropping": self.token_dropping,
        }

    @classmethod
    def from_json(cls, d: Any) -> Provenance:
        if not isinstance(d, dict) or set(d) != {"primed_from", "merged_from", "token_dropping"}:
            raise CorruptStateError(
                "state header: provenance must hold primed_from, merged_from, token_dropping"
            )
        if not isinstance(d["merged_from"], list):
            raise CorruptStateError("state header: provenance merged_from must be a list")
        try:
            return cls(d["primed_from"], tuple(d["merged_from"]), d["token_dropping"])
        except ValueError as e:
            raise CorruptStateError(f"state header: {e}") from None


@dataclass(frozen=True)
class StateMeta:
    """Everything about an encoded state except its tensors (readable without decoding them)."""

    fingerprint: str  # model fingerprint (config + weights) of the model that made the state
    config: dict[str, int]  # RetNetConfig.fingerprint_dict() of that model
    dtype: str  # storage dtype: float32 / float64 (exact) or bfloat16 / float16 (lossy)
    state_dtype: str  # dtype of the decoded state (the dtype it had when encoded)
    positions: tuple[int, ...]  # tokens seen, per row
    created_at: float  # unix seconds
    updated_at: float  # unix seconds
    provenance: Provenance = field(default_factory=Provenance)
    compression: str = "none"
    format_version: int = FORMAT_VERSION

    @property
    def batch_size(self) -> int:
        return len(self.positions)

    @property
    def lossy(self) -> bool:
        return self.dtype != self.state_dtype

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": self.format_version,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "dtype": self.dtype,
            "state_dtype": self.state_dtype,
            "positions": list(self.positions),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "provenance": self.provenance.to_json(),
            "compression": self.compression,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def loads(cls, text: str) -> StateMeta:
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise CorruptStateError(
                f"state header: the {META_KEY!r} record is not valid JSON ({e})"
            ) from None
        return cls.from_json(d)

    @classmethod
    def from_json(cls, d: Any) -> StateMeta:
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise StateFormatError(f"not a retserve state: the header's format is not {FORMAT_NAME!r}")
        v = d.get("version")
        if not _is_int(v) or v not in SUPPORTED_VERSIONS:
            raise StateVersionError(
                f"state format version {v!r} is not supported (this code reads {sorted(SUPPORTED_VERSIONS)});"
                " re-save the state with a matching retserve version"
            )
        want = {
            "format", "version", "fingerprint", "config", "dtype", "state_dtype", "positions",
            "created_at", "updated_at", "provenance", "compression",
        }  # fmt: skip
        if set(d) != want:
            raise CorruptStateError(f"state header: fields {sorted(set(d) ^ want)} are missing or unexpected")
        if not isinstance(d["fingerprint"], str):
            raise CorruptStateError("state header: fingerprint must be a string")
        try:
            check_fingerprint(d["fingerprint"])
        except ValueError as e:
            raise CorruptStateError(f"state header: {e}") from None
        cfg = d["config"]
        if not isinstance(cfg, dict) or not all(isinstance(k, str) and _is_int(x) for k, x in cfg.items()):
            raise CorruptStateError("state header: config must map names to integers")
        if d["dtype"] not in STORAGE_DTYPES:
            raise CorruptStateError(
                f"state header: dtype {d['dtype']!r} is not one of {list(STORAGE_DTYPES)}"
            )
        if d["state_dtype"] not in STATE_DTYPES:
            raise CorruptStateError(
                f"state header: state_dtype {d['state_dtype']!r} is not one of {STATE_DTYPES}"
            )
        pos = d["positions"]
        if not isinstance(pos, list) or not pos or not all(_is_int(p) and 0 <= p < 2**62 for p in pos):
            raise CorruptStateError(
                "state header: positions must be a non-empty list of non-negative integers"
            )
        for name in ("created_at", "updated_at"):
            t = d[name]
            if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
                raise CorruptStateError(f"state header: {name} must be a non-negative number of seconds")
        if d["compression"] not in COMPRESSIONS:
            raise CorruptStateError(
                f"state header: compression {d['compression']!r} is not one of {list(COMPRESSIONS)}"
            )
        return cls(
            fingerprint=d["fingerprint"],
            config=dict(cfg),
            dtype=d["dtype"],
            state_dtype=d["state_dtype"],
            positions=tuple(pos),
            created_at=float(d["created_at"]),
            updated_at=float(d["updated_at"]),
            provenance=Provenance.from_json(d["provenance"]),
            compression=d["compression"],
            format_version=v,
        )


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors code (F32, BF16, ...)
    shape: tuple[int, ...]
    begin: int  # offsets into the data buffer (after the header)
    end: int


@dataclass(frozen=True)
class Frame:
    """A validated safetensors framing: tensor entries, metadata, where the data buffer starts."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sniff(data: bytes) -> str:
    """A hint about what non-state bytes look like, for the error message."""
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return (
            " (it looks like a Python pickle: pickles are never loaded; re-save the state with state_store)"
        )
    if data[:4] == b"PK\x03\x04":
        return " (it looks like a zip / torch.save file: only safetensors states are read)"
    return ""


def parse_frame(data: bytes | bytearray | memoryview) -> Frame:
    """Validate the safetensors framing of `data`; raise StateFormatError if it is not one."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise StateFormatError(f"an encoded state is bytes, got {type(data).__name__}")
    n = len(data)
    if n < 8:
        raise StateFormatError(f"not a retserve state: {n} bytes is shorter than the 8-byte header length")
    (hlen,) = struct.unpack("<Q", bytes(data[:8]))
    if hlen > MAX_HEADER_BYTES or hlen > n - 8 or hlen < 2:
        raise StateFormatError(
            f"not a retserve state: header length {hlen} does not fit in {n} bytes"
            f" (or exceeds {MAX_HEADER_BYTES}){_sniff(bytes(data[:8]))}"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise StateFormatError(
            f"not a retserve state: the header is not UTF-8 JSON{_sniff(bytes(data[:8]))}"
        ) from None
    if not isinstance(header, dict):
        raise StateFormatError("not a retserve state: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise StateFormatError("not a retserve state: the safetensors header has no string __metadata__")
    tensors: dict[str, TensorEntry] = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise StateFormatError(f"not a retserve state: tensor entry {name!r} is malformed")
        dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dt not in DTYPE_SIZES:
            raise CorruptStateError(f"tensor {name!r} has dtype {dt!r}; states use {sorted(DTYPE_SIZES)}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(s) and s >= 0 for s in shape):
            raise StateFormatError(f"not a retserve state: tensor {name!r} has a malformed shape")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) and o >= 0 for o in offs):
            raise StateFormatError(f"not a retserve state: tensor {name!r} has malformed data offsets")
        if offs[1] - offs[0] != math.prod(shape) * DTYPE_SIZES[dt]:
            raise StateFormatError(f"not a retserve state: tensor {name!r} offsets do not match its shape")
        tensors[name] = TensorEntry(name, dt, tuple(shape), offs[0], offs[1])
    start = 8 + hlen
    expected = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != expected:
            raise StateFormatError("not a retserve state: tensor data is not laid out contiguously")
        expected = t.end
    if start + expected != n:
        raise StateFormatError(
            f"encoded state has {n} bytes but its header describes {start + expected}"
            f" ({'truncated' if n < start + expected else 'trailing bytes'})"
        )
    return Frame(tensors, dict(metadata), start)


def read_meta(data: bytes | bytearray | memoryview) -> tuple[StateMeta, Frame]:
    """Parse the framing and the `StateMeta` record (no tensor data is read)."""
    frame = parse_frame(data)
    text = frame.metadata.get(META_KEY)
    if text is None:
        raise StateFormatError(
            f"a safetensors file, but not a retserve state (no {META_KEY!r} metadata): states are written"
            " by state_store's codec"
        )
    return StateMeta.loads(text), frame
