"""The encoded state's framing: a safetensors file whose metadata holds a versioned `StateMeta`.

This module parses and validates the framing of untrusted bytes without touching tensor data:
the 8-byte header length, the JSON header, every tensor entry (dtype, shape, offsets that tile the
data buffer exactly) and the `retserve` metadata record. Nothing here can execute code: JSON is the
only parser involved, and every size is checked against the actual length of the input.

Checksum (format version 2): the safetensors metadata key `retserve_crc32` holds 8 hex digits, the
CRC-32 (zlib's, IEEE polynomial) of the whole blob (length prefix, JSON header, every tensor byte)
computed with those 8 digits replaced by "00000000". A flipped byte anywhere changes it. zlib.crc32
runs at ~2.9 GB/s on one core (35 ms per 100 MB; one pass each way, no extra copy: encoding a 100 MB
state with it is faster than version 1 was without it), so the stdlib is used rather than a CRC32C
dependency. It detects accidents (bit rot, truncated copies, bad edits),
not forgery: anyone can recompute it, so every other check still runs.

Version 1 blobs (no checksum, no logits) are still read, with every other check (shapes, finiteness,
positions, bounds); writers always write version 2. Positions are limited to 0 <= p < 2^53
(`MAX_POSITION`): exact in a float64, and far beyond any real sequence. The codec reads states only
up to 2^52 (`MAX_READ_POSITION`, state_store/codec.py), so that an imported state can read 2^52
more tokens before it reaches what can be written: it can always be saved again.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from state_store.errors import CorruptStateError, StateFormatError, StateVersionError
from state_store.fingerprint import check_fingerprint

FORMAT_NAME = "retserve-state"
FORMAT_VERSION = 2  # 2: CRC-32 checksum, optional next-token logits; 1: neither (still read)
SUPPORTED_VERSIONS = frozenset({1, 2})
META_KEY = "retserve"
CHECKSUM_KEY = "retserve_crc32"
CHECKSUM_PLACEHOLDER = "00000000"
MAX_POSITION = 2**53  # positions are 0 <= p < MAX_POSITION
MAX_HEADER_BYTES = 1 << 20  # the JSON header; a state's has a few hundred bytes + provenance
MAX_MERGED_FROM = 1024
MAX_LABEL_CHARS = 512

# safetensors dtype codes this format uses, with their item sizes.
DTYPE_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "U8": 1}
STORAGE_DTYPES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16"}
STATE_DTYPES = ("float32", "float64")
COMPRESSIONS = ("none", "zlib")


class ChecksumError(CorruptStateError):
    """The blob's bytes are not the ones its writer checksummed (a flipped byte, a bad edit)."""


@dataclass(frozen=True)
class Provenance:
    """Where a state came from. Free of tensor data; stored in the header."""

    primed_from: str | None = None  # digest of the text a primed-document state was made from
    merged_from: tuple[str, ...] = ()  # sessions whose states were merged into this one
    token_dropping: str | None = None  # token-dropping policy used while reading (None = none)
    merge_mode: str | None = None  # "concat" | "average" when merged_from is set
    merge_weights: tuple[float, ...] = ()  # average: one weight per merged_from entry

    def __post_init__(self) -> None:
        for name in ("primed_from", "token_dropping", "merge_mode"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not 0 < len(v) <= MAX_LABEL_CHARS):
                raise ValueError(f"provenance {name} must be None or a string of 1..{MAX_LABEL_CHARS} chars")
        if not isinstance(self.merged_from, tuple) or len(self.merged_from) > MAX_MERGED_FROM:
            raise ValueError(f"provenance merged_from must be a tuple of at most {MAX_MERGED_FROM} ids")
        for s in self.merged_from:
            if not isinstance(s, str) or not 0 < len(s) <= MAX_LABEL_CHARS:
                raise ValueError(f"provenance merged_from entries must be strings of 1..{MAX_LABEL_CHARS}")
        if not isinstance(self.merge_weights, tuple) or len(self.merge_weights) > MAX_MERGED_FROM:
            raise ValueError(f"provenance merge_weights must be a tuple of at most {MAX_MERGED_FROM} numbers")
        for w in self.merge_weights:
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                raise ValueError("provenance merge_weights entries must be finite numbers")

    def to_json(self) -> dict[str, Any]:
        return {
            "primed_from": self.primed_from,
            "merged_from": list(self.merged_from),
            "token_dropping": self.token_dropping,
            "merge_mode": self.merge_mode,
            "merge_weights": list(self.merge_weights),
        }

    @classmethod
    def from_json(cls, d: Any) -> Provenance:
        base = {"primed_from", "merged_from", "token_dropping"}
        # merge_mode/merge_weights came later: headers written before them hold only the base keys.
        if not isinstance(d, dict) or set(d) not in (base, base | {"merge_mode", "merge_weights"}):
            raise CorruptStateError(
                "state header: provenance must hold primed_from, merged_from, token_dropping"
                " (and optionally merge_mode, merge_weights)"
            )
        if not isinstance(d["merged_from"], list) or not isinstance(d.get("merge_weights", []), list):
            raise CorruptStateError("state header: provenance merged_from and merge_weights must be lists")
        try:
            return cls(
                d["primed_from"],
                tuple(d["merged_from"]),
                d["token_dropping"],
                d.get("merge_mode"),
                tuple(d.get("merge_weights", [])),
            )
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
    logits: bool = False  # the blob holds next-token logits (version >= 2)
    format_version: int = FORMAT_VERSION

    @property
    def batch_size(self) -> int:
        return len(self.positions)

    @property
    def lossy(self) -> bool:
        return self.dtype != self.state_dtype

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
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
        if self.format_version >= 2:
            d["logits"] = self.logits
        return d

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
        if v >= 2:
            want.add("logits")
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
        if not isinstance(pos, list) or not pos or not all(_is_int(p) for p in pos):
            raise CorruptStateError("state header: positions must be a non-empty list of integers")
        for row, p in enumerate(pos):
            if not 0 <= p < MAX_POSITION:
                raise CorruptStateError(
                    f"state header: positions: row {row} has position {p}, outside 0 <= position < 2^53"
                    f" ({MAX_POSITION})"
                )
        logits = d.get("logits", False)
        if not isinstance(logits, bool):
            raise CorruptStateError("state header: logits must be true or false")
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
            logits=logits,
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


def read_meta(
    data: bytes | bytearray | memoryview, *, verify_checksum: bool = False
) -> tuple[StateMeta, Frame]:
    """Parse the framing and the `StateMeta` record (no tensor data is read).

    With `verify_checksum`, a blob's checksum is verified before its record is parsed (one pass over
    every byte), and a version >= 2 blob without one is refused.
    """
    frame = parse_frame(data)
    if verify_checksum and CHECKSUM_KEY in frame.metadata:
        check_checksum(data, frame)
    text = frame.metadata.get(META_KEY)
    if text is None:
        raise StateFormatError(
            f"a safetensors file, but not a retserve state (no {META_KEY!r} metadata): states are written"
            " by state_store's codec"
        )
    meta = StateMeta.loads(text)
    if verify_checksum and meta.format_version >= 2 and CHECKSUM_KEY not in frame.metadata:
        raise ChecksumError(
            f"the state (format version {meta.format_version}) has no {CHECKSUM_KEY!r} checksum: it was"
            " altered after it was written; export it again from the server that made it"
        )
    return meta, frame


# ---- checksum ---------------------------------------------------------------------------------------
def _checksum_span(data: bytes | bytearray | memoryview, frame: Frame) -> tuple[int, int]:
    """Offsets of the checksum's 8 hex digits in `data` (they must appear exactly once, as written)."""
    needle = f'"{CHECKSUM_KEY}":"'.encode()
    header = bytes(data[8 : frame.data_start])
    at = header.find(needle)
    if at < 0 or header.find(needle, at + 1) >= 0:
        raise ChecksumError(
            f"the {CHECKSUM_KEY!r} checksum is not where the writer puts it: the header was altered"
        )
    begin = 8 + at + len(needle)
    return begin, begin + len(CHECKSUM_PLACEHOLDER)


def _crc(data: bytes | bytearray | memoryview, span: tuple[int, int]) -> str:
    view = memoryview(data).cast("B")
    crc = zlib.crc32(view[: span[0]])
    crc = zlib.crc32(CHECKSUM_PLACEHOLDER.encode(), crc)
    return f"{zlib.crc32(view[span[1] :], crc):08x}"


def check_checksum(data: bytes | bytearray | memoryview, frame: Frame) -> None:
    """Raise ChecksumError unless the blob's recorded checksum matches its bytes."""
    stored = frame.metadata[CHECKSUM_KEY]
    span = _checksum_span(data, frame)
    if bytes(data[span[0] : span[1]]).decode("ascii", "replace") != stored:
        raise ChecksumError(f"the {CHECKSUM_KEY!r} checksum is not where the writer puts it")
    actual = _crc(data, span)
    if stored != actual:
        raise ChecksumError(
            f"checksum mismatch (recorded {stored[:16]!r}, the bytes give {actual!r}): the state was"
            " corrupted or altered after it was written; export it again from the server that made it"
        )


def seal_parts(head: bytes, payload: Sequence[bytes | memoryview]) -> bytes:
    """A blob = `head` (8-byte length + JSON header whose metadata holds `{CHECKSUM_KEY:
    CHECKSUM_PLACEHOLDER}`) + the tensor bytes in `payload`, with the checksum filled in. The tensor
    bytes are read once for the CRC and copied once into the result."""
    needle = f'"{CHECKSUM_KEY}":"{CHECKSUM_PLACEHOLDER}"'.encode()
    at = head.find(needle)
    if at < 8 or head.find(needle, at + 1) >= 0:
        raise ValueError(f"the header must hold {CHECKSUM_KEY!r}: {CHECKSUM_PLACEHOLDER!r} once")
    crc = zlib.crc32(head)
    for part in payload:
        crc = zlib.crc32(part, crc)
    begin = at + len(needle) - 1 - len(CHECKSUM_PLACEHOLDER)
    head = head[:begin] + f"{crc:08x}".encode() + head[begin + len(CHECKSUM_PLACEHOLDER) :]
    return b"".join((head, *payload))


def seal(data: bytes) -> bytes:
    """Fill in the checksum of a safetensors blob written with `{CHECKSUM_KEY: CHECKSUM_PLACEHOLDER}`
    in its metadata (tests craft blobs with it; the codec uses `seal_parts`)."""
    frame = parse_frame(data)
    if frame.metadata.get(CHECKSUM_KEY) != CHECKSUM_PLACEHOLDER:
        raise ValueError(f"seal needs {CHECKSUM_KEY!r}: {CHECKSUM_PLACEHOLDER!r} in the blob's metadata")
    view = memoryview(data)
    return seal_parts(bytes(view[: frame.data_start]), [view[frame.data_start :]])
