"""The state codec: bit-exact fp32 round trips, the header, the lossy options' error on a real state,
compression, and model fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.config import preset
from model.retnet import RetNet
from model.state import RetentionState
from state_store import (
    FORMAT_VERSION,
    ModelMismatchError,
    Provenance,
    StateCodec,
    StateCodecError,
    config_fingerprint,
    max_abs_error,
    max_rel_error,
    model_fingerprint,
)
from state_store.errors import CorruptStateError
from tests.support.state import tiny_codec, tiny_fingerprint, tiny_model, tiny_state

Small = tuple[RetNet, RetentionState, StateCodec]


@pytest.fixture(scope="module")
def small() -> Small:
    """A real `small`-preset state: the model after reading 512 tokens (not random tensors)."""
    torch.manual_seed(0)
    m = RetNet(preset("small")).eval()
    with torch.inference_mode():
        _, s = m(torch.randint(0, 8192, (1, 512)))
    return m, s, StateCodec(m.config, model_fingerprint(m))


def test_fp32_roundtrip_is_bit_exact_tiny_multi_row() -> None:
    rows = RetentionState.stack(
        [tiny_state(tokens=3, seed=1), tiny_state(tokens=40, seed=2), tiny_state(seed=3)]
    )
    codec = tiny_codec()
    out = codec.decode(codec.encode(rows))
    assert out.state.equal(rows) and out.state.dtype == torch.float32
    assert out.meta.positions == (3, 40, 9) and out.meta.batch_size == 3
    for a, b in zip(out.state.split(), rows.split(), strict=True):
        assert a.equal(b)


def test_fp32_roundtrip_is_bit_exact_small_real_state(small: Small) -> None:
    _, s, codec = small
    data = codec.encode(s)
    assert len(data) > s.nbytes  # header + position on top of 294,912 bytes of layers
    out = codec.decode(data)
    assert out.state.equal(s)
    pairs = zip(out.state.layers, s.layers, strict=True)
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in pairs)


def test_float64_states_roundtrip_exactly() -> None:
    s = tiny_state().to(dtype=torch.float64)
    s.layers[0][0, 0, 0, 0] = 1 / 3  # a value float32 cannot hold
    codec = tiny_codec()
    out = codec.decode(codec.encode(s))
    assert out.meta.dtype == "float64" and out.state.dtype == torch.float64 and out.state.equal(s)


def test_header_records_everything() -> None:
    prov = Provenance(
        primed_from="sha256:" + "0f" * 32, merged_from=("t/a", "t/b"), token_dropping="keep-mask"
    )
    codec = tiny_codec()
    data = codec.encode(tiny_state(), provenance=prov, created_at=1700000000.5, updated_at=1700000100.25)
    meta = codec.read_meta(data)  # without decoding tensors
    assert meta.format_version == FORMAT_VERSION == 2 and not meta.logits
    assert meta.fingerprint == tiny_fingerprint()
    assert meta.config == tiny_model().config.fingerprint_dict()
    assert (meta.dtype, meta.state_dtype, meta.compression) == ("float32", "float32", "none")
    assert meta.positions == (9,)
    assert (meta.created_at, meta.updated_at) == (1700000000.5, 1700000100.25)
    assert meta.provenance == prov and not meta.lossy
    fresh = codec.read_meta(codec.encode(tiny_state()))
    assert fresh.created_at == fresh.updated_at and fresh.created_at > 1.7e9


def test_provenance_records_merges_and_reads_headers_without_merge_fields() -> None:
    prov = Provenance(merged_from=("a", "b", "c"), merge_mode="average", merge_weights=(0.5, 0.25, 0.25))
    codec = tiny_codec()
    assert codec.read_meta(codec.encode(tiny_state(), provenance=prov)).provenance == prov
    old = {"primed_from": None, "merged_from": ["a"], "token_dropping": None}  # written before merges
    assert Provenance.from_json(old) == Provenance(merged_from=("a",))
    with pytest.raises(ValueError, match="merge_weights"):
        Provenance(merge_weights=(float("nan"),))


def test_encoded_state_is_plain_safetensors(tmp_path: Path) -> None:
    data = tiny_codec().encode(tiny_state())
    path = tmp_path / "state.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["layers.0", "layers.1", "position"]
        header = json.loads(f.metadata()["retserve"])
        assert header["format"] == "retserve-state" and header["version"] == 2
        assert torch.equal(f.get_tensor("layers.1"), tiny_state().layers[1])


@pytest.mark.parametrize(("dtype", "unit_roundoff"), [("bfloat16", 2.0**-8), ("float16", 2.0**-11)])
def test_lossy_storage_error_on_a_real_state(small: Small, dtype: str, unit_roundoff: float) -> None:
    """bf16 / fp16 storage: each value within its format's rounding error; the model's next logits too."""
    m, s, codec = small
    exact = codec.encode(s)
    data = codec.encode(s, storage_dtype=dtype)
    out = codec.decode(data)
    assert out.meta.lossy and out.meta.dtype == dtype and out.state.dtype == torch.float32
    assert len(data) < 0.51 * len(exact)
    for a, b in zip(s.layers, out.state.layers, strict=True):
        err = (a.double() - b.double()).abs()
        assert bool((err <= unit_roundoff * a.double().abs() + 2.0**-24).all())
    rel = max_rel_error(s, out.state)
    assert 0 < rel <= unit_roundoff
    nxt = torch.tensor([[17]])
    with torch.inference_mode():
        want, _ = m(nxt, state=s)
        got, _ = m(nxt, state=out.state)
    logit_err = (want - got).abs().max().item()
    print(
        f"{dtype}: max abs state error {max_abs_error(s, out.state):.3g}, max rel {rel:.3g},"
        f" next-token logits max abs error {logit_err:.3g} (logit range {want.abs().max().item():.3g})"
    )
    assert logit_err < 0.05 * want.abs().max().item()


def test_compression_is_exact_and_smaller_on_a_real_state(small: Small) -> None:
    _, s, codec = small
    plain = codec.encode(s)
    packed = codec.encode(s, compression="zlib")
    out = codec.decode(packed)
    assert out.meta.compression == "zlib" and out.state.equal(s)
    assert len(packed) < 0.95 * len(plain)
    bf = codec.encode(s, storage_dtype="bfloat16", compression="zlib")
    assert len(bf) < len(codec.encode(s, storage_dtype="bfloat16"))
    assert max_rel_error(s, codec.decode(bf).state) <= 2.0**-8
    zc = StateCodec(codec.config, codec.fingerprint, compression="zlib", compression_level=6)
    assert zc.decode(zc.encode(s)).state.equal(s)


def test_float16_refuses_values_out_of_its_range() -> None:
    s = tiny_state()
    s.layers[1][0, 0, 0, 0] = 1e5
    with pytest.raises(StateCodecError, match="bfloat16"):
        tiny_codec(storage_dtype="float16").encode(s)
    out = tiny_codec(storage_dtype="bfloat16").decode(tiny_codec(storage_dtype="bfloat16").encode(s))
    assert out.state.layers[1][0, 0, 0, 0].item() == pytest.approx(1e5, rel=2**-8)


def test_encode_refuses_bad_states() -> None:
    s = tiny_state()
    s.layers[0][0, 0, 0, 1] = float("nan")
    with pytest.raises(CorruptStateError, match="NaN"):
        tiny_codec().encode(s)
    other = RetentionState.empty(preset("tiny", hidden_size=64), 1)
    with pytest.raises(ModelMismatchError, match="cannot encode"):
        tiny_codec().encode(other)
    with pytest.raises(TypeError, match="RetentionState"):
        tiny_codec().encode({"layers": []})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="storage_dtype"):
        tiny_codec(storage_dtype="int8")
    with pytest.raises(ValueError, match="compression"):
        tiny_codec(compression="lz4")
    with pytest.raises(ValueError, match="fingerprint"):
        StateCodec(tiny_model().config, "not-a-fingerprint")


def test_fingerprint_is_stable_and_covers_weights_and_config() -> None:
    fp = model_fingerprint(tiny_model())
    assert fp == model_fingerprint(tiny_model()) == tiny_fingerprint()
    torch.manual_seed(0)
    same = RetNet(preset("tiny")).eval()
    assert model_fingerprint(same) == fp  # same weights, another object
    with torch.no_grad():
        same.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6
    assert model_fingerprint(same) != fp  # one weight changed by 1e-6
    torch.manual_seed(0)
    wider = RetNet(preset("tiny", intermediate_size=128))
    assert model_fingerprint(wider) != fp
    assert config_fingerprint(preset("tiny")) != fp and config_fingerprint(preset("tiny")).startswith("rn1-")
