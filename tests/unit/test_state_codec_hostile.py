"""Hostile input to the codec: truncated, oversized, wrong model, pickles, random bytes, crafted headers.

Decoding must raise a StateCodecError subclass with a message saying what is wrong, never another
exception, never hang, and never execute anything.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import pickle
import random
import struct
import zlib

import pytest
import torch
from safetensors.torch import save as st_save

from model.config import preset
from model.retnet import RetNet
from state_store import (
    CorruptStateError,
    ModelMismatchError,
    StateCodec,
    StateCodecError,
    StateFormatError,
    StateVersionError,
    model_fingerprint,
)
from state_store.header import MAX_HEADER_BYTES
from tests.support.state import blob_parts, craft_blob, tiny_codec, tiny_state


def _valid() -> bytes:
    return tiny_codec().encode(tiny_state())


_parts = blob_parts
_craft = craft_blob


def _refused(data: bytes, codec: StateCodec | None = None) -> StateCodecError:
    codec = codec or tiny_codec()
    with pytest.raises(StateCodecError) as e:
        codec.decode(data)
    assert str(e.value)  # says what is wrong
    return e.value


def test_truncated_input_is_refused_at_every_length() -> None:
    data = _valid()
    n = len(data)
    cuts = set(range(0, 400)) | set(range(n - 64, n)) | set(random.Random(0).sample(range(n), 200))
    for cut in sorted(cuts):
        if cut < n:
            err = _refused(data[:cut])
            assert isinstance(err, StateFormatError)
    assert "truncated" in str(_refused(data[:-1]))


def test_oversized_input_is_refused() -> None:
    data = _valid()
    assert "trailing" in str(_refused(data + b"\0"))
    assert "trailing" in str(_refused(data + b"x" * 10_000))
    huge_len = struct.pack("<Q", 2**63) + data[8:]
    assert "header length" in str(_refused(huge_len))
    too_long_header = struct.pack("<Q", MAX_HEADER_BYTES + 1) + b" " * (MAX_HEADER_BYTES + 100)
    assert "header length" in str(_refused(too_long_header))
    # A header claiming many rows: refused before any allocation (max_batch).
    big = tiny_codec().encode(tiny_state(batch=3))
    err = _refused(big, tiny_codec(max_batch=2))
    assert isinstance(err, CorruptStateError) and "max_batch" in str(err)


def test_wrong_model_is_refused() -> None:
    data = _valid()
    torch.manual_seed(1)  # same shapes, other weights
    other = RetNet(preset("tiny")).eval()
    err = _refused(data, StateCodec(other.config, model_fingerprint(other)))
    assert isinstance(err, ModelMismatchError) and "other weights" in str(err)
    torch.manual_seed(0)
    wider = RetNet(preset("tiny", hidden_size=64)).eval()
    err = _refused(data, StateCodec(wider.config, model_fingerprint(wider)))
    assert isinstance(err, ModelMismatchError) and "hidden_size 32 vs 64" in str(err)


class _Payload:
    def __reduce__(self) -> tuple:  # what an attacker's pickle would run on load
        return (exec, ("import builtins; builtins._retserve_pwned = True",))


def test_pickles_are_never_loaded() -> None:
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        err = _refused(pickle.dumps({"state": _Payload()}, protocol=proto))
        assert "pickle" in str(err)
    _refused(pickle.dumps(_Payload(), protocol=0))
    buf = io.BytesIO()
    torch.save({"layers": tiny_state().layers, "position": tiny_state().position}, buf)
    assert "zip" in str(_refused(buf.getvalue()))
    assert not hasattr(builtins, "_retserve_pwned")


def test_random_bytes_never_crash() -> None:
    rng = random.Random(1234)
    valid = _valid()
    for i in range(400):
        n = rng.choice([0, 1, 7, 8, 9, 50, 500, 5000])
        blob = rng.randbytes(n)
        if i % 2:  # a plausible header length in front of the noise
            blob = struct.pack("<Q", max(0, n - 8 - rng.randint(0, 8))) + blob
        _refused(blob)
    for i in range(300):  # single flipped bytes anywhere: refused or decoded, never another error
        b = bytearray(valid)
        pos = rng.randrange(len(b)) if i % 3 else rng.randrange(min(len(b), 600))
        b[pos] ^= 1 << rng.randrange(8)
        with contextlib.suppress(StateCodecError):
            tiny_codec().decode(bytes(b))


def test_crafted_headers_are_refused() -> None:
    meta, tensors = _parts(_valid())
    assert tiny_codec().decode(_craft(meta, tensors)).state.equal(tiny_state())  # the crafting is faithful

    def variant(**changes: object) -> dict:
        return {**meta, **changes}

    assert isinstance(_refused(_craft(variant(version=3), tensors)), StateVersionError)
    assert "format" in str(_refused(_craft(variant(format="other"), tensors)))
    assert "missing or unexpected" in str(_refused(_craft({**meta, "extra": 1}, tensors)))
    assert "dtype" in str(_refused(_craft(variant(dtype="int8"), tensors)))
    assert "positions" in str(_refused(_craft(variant(positions=[-1]), tensors)))
    assert "disagrees" in str(_refused(_craft(variant(positions=[10]), tensors)))
    assert "compression" in str(_refused(_craft(variant(compression="lz4"), tensors)))
    assert "created_at" in str(_refused(_craft(variant(created_at="yesterday"), tensors)))
    assert "fingerprint" in str(_refused(_craft(variant(fingerprint="rn1-xyz"), tensors)))
    assert "provenance" in str(_refused(_craft(variant(provenance={"primed_from": 3}), tensors)))
    deep = "[" * 100_000 + "]" * 100_000
    assert isinstance(_refused(st_save(tensors, metadata={"retserve": deep})), StateCodecError)
    assert "no 'retserve'" in str(_refused(st_save(tensors, metadata={"format": "pt"})))
    assert "no string __metadata__" in str(_refused(st_save(tensors)))


def test_crafted_tensors_are_refused() -> None:
    meta, tensors = _parts(_valid())
    nan = dict(tensors)
    nan["layers.1"] = tensors["layers.1"].clone()
    nan["layers.1"][0, 1, 2, 3] = float("inf")
    assert "NaN or infinite" in str(_refused(_craft(meta, nan)))
    assert "F16" in str(_refused(_craft(meta, {**tensors, "layers.0": tensors["layers.0"].half()})))
    shape = {**tensors, "layers.0": torch.zeros(1, 2, 16, 16)}
    assert "layer 0" in str(_refused(_craft(meta, shape)))
    assert "expected" in str(_refused(_craft(meta, {**tensors, "extra": torch.zeros(1)})))
    missing = {k: v for k, v in tensors.items() if k != "layers.1"}
    assert "expected" in str(_refused(_craft(meta, missing)))
    assert "int64" in str(_refused(_craft(meta, {**tensors, "position": tensors["position"].double()})))
    assert "I32" in str(_refused(_craft(meta, {**tensors, "position": tensors["position"].int()})))
    two_rows = {**tensors, "position": torch.tensor([9, 9])}
    _refused(_craft({**meta, "positions": [9, 9]}, two_rows))  # layers still have one row


def test_hostile_compressed_layers_are_refused() -> None:
    meta, tensors = _parts(tiny_codec(compression="zlib").encode(tiny_state()))
    layers_size = sum(t.numel() * 4 for t in tiny_state().layers)

    def with_blob(blob: bytes) -> bytes:
        t = {**tensors, "layers.zlib": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
        return _craft(meta, t)

    bomb = zlib.compress(b"\0" * (200 * layers_size), 9)  # inflates far past a state's size
    assert "exactly" in str(_refused(with_blob(bomb)))
    assert "exactly" in str(_refused(with_blob(zlib.compress(b"\0" * (layers_size - 4)))))
    assert "zlib" in str(_refused(with_blob(b"\x78\x9c" + b"garbage" * 10)))
    ok = bytes(tensors["layers.zlib"].numpy())
    assert "exactly" in str(_refused(with_blob(ok[: len(ok) // 2])))
    n = layers_size // 4
    nonfinite = b"\0" * n + b"\0" * n + b"\xc0" * n + b"\x7f" * n  # byte planes of float32 NaN (shuffled)
    assert "NaN" in str(_refused(with_blob(zlib.compress(nonfinite))))


def test_non_bytes_input_is_refused() -> None:
    for bad in (None, "text", 123, [1, 2]):
        with pytest.raises(StateCodecError, match="bytes"):
            tiny_codec().decode(bad)  # type: ignore[arg-type]
    assert tiny_codec().decode(bytearray(_valid())).state.equal(tiny_state())
