"""Zero-copy safetensors reading: tensors that are views of a private memory map of the file.

`safetensors`' own readers copy every tensor into fresh memory; for a 2.7 GB checkpoint that means the
file's pages and the copies are resident together while loading. Here the file is mapped copy-on-write
(`mmap.ACCESS_COPY`: never written back; a later in-place change of a weight copies just that page) and
each tensor is `torch.frombuffer` over its byte range, so loading costs the weights' size once. The
header is checked strictly first (JSON object, known dtypes, shapes, in-bounds non-overlapping ranges
whose lengths match the shapes), so a malformed file is an error, never a crash.
"""

from __future__ import annotations

import itertools
import json
import mmap
import struct
from pathlib import Path

import torch
from torch import Tensor

# Below this total size a checkpoint is simply read into memory (tests, the shipped model).
MMAP_MIN_BYTES = 64 * 2**20
_MAX_HEADER = 100 * 2**20
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _header(buf: mmap.mmap, size: int) -> tuple[dict, int]:
    if size < 8:
        raise ValueError("file is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > min(_MAX_HEADER, size - 8):
        raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
    header = json.loads(bytes(buf[8 : 8 + n]).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def map_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, as views of a copy-on-write map of it."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    if buf is None:
        raise ValueError("file is empty")
    header, start = _header(buf, size)
    out: dict[str, Tensor] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype must be one of {sorted(DTYPES)}, got {info!r}")
        dtype, shape, offsets = DTYPES[info["dtype"]], info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"tensor {name!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not (0 <= begin <= end <= size - start) or end - begin != numel * itemsize:
            raise ValueError(f"tensor {name!r}: data_offsets {offsets} do not fit its shape or the file")
        spans.append((begin, end, name))
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=start + begin).view(shape)
        out[name] = t if t.data_ptr() % itemsize == 0 else t.clone()  # unaligned: copy this one
    spans.sort()
    for (_, e0, a), (b1, _, b) in itertools.pairwise(spans):
        if b1 < e0:
            raise ValueError(f"tensors {a!r} and {b!r} overlap")
    return out
