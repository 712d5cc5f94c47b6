"""Loading fla-hub-shaped directories: sharded bf16 safetensors through the index, kept as stored and
memory-mapped (no copy), tied embeddings, errors that list keys and name files, a stable fingerprint."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import CheckpointError, from_pretrained, load_config, load_stored, stored_dtype
from model.config import RetNetConfig, preset
from model.mmap_safetensors import map_safetensors
from model.retnet import RetNet
from model.state import RetentionState
from server.runtime import float32_fingerprint, pick_dtype
from state_store import model_fingerprint
from tests.support.hf_model import build_hf_model, fla_config, write_sharded

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "retserve-small"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_model(tmp_path_factory.mktemp("hf") / "m")


def test_sharded_bf16_loads_as_stored_and_mapped(model_dir: Path) -> None:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert stored_dtype(model_dir) == torch.bfloat16
    mapped, copied = load_stored(model_dir, mmap=True), load_stored(model_dir, mmap=False)
    assert {p.dtype for p in mapped.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(mapped.state_dict().items(), copied.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # the mapped parameters are the file's pages, not copies: they lie in memory exactly as in the file
    shard = model_dir / "model-00001-of-00002.safetensors"
    (n,) = struct.unpack("<Q", shard.read_bytes()[:8])
    header = json.loads(shard.read_bytes()[8 : 8 + n])
    params = mapped.state_dict()
    names = sorted(k for k in header if k in params)
    assert len(names) > 3
    for name in names:
        file_gap = header[name]["data_offsets"][0] - header[names[0]]["data_offsets"][0]
        assert params[name].data_ptr() - params[names[0]].data_ptr() == file_gap, name
    assert float32_fingerprint(mapped) == model_fingerprint(from_pretrained(model_dir))
    ids = torch.tensor([[1, 300, 301, 302]])
    with torch.inference_mode():
        lo_bf16, _ = mapped(ids)
        lo_fp32, _ = from_pretrained(model_dir)(ids)
    assert torch.allclose(lo_bf16.float(), lo_fp32, atol=0.1, rtol=0.05)


def test_shipped_fingerprint_is_unchanged() -> None:
    # existing session blobs carry the fingerprint of the float32 model; the shipped weights are stored
    # in bf16 and the server now keeps them so until it casts to its serving dtype
    stored = load_stored(SHIPPED, mmap=True)
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16} and stored_dtype(SHIPPED) is None
    assert float32_fingerprint(stored) == model_fingerprint(from_pretrained(SHIPPED))


def test_auto_dtype_keeps_bf16_weights_on_cpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_dtype("auto", cpu, torch.bfloat16) == torch.bfloat16
    assert pick_dtype("auto", cpu, torch.float16) == torch.float32
    assert pick_dtype("auto", cpu, torch.float32) == torch.float32
    assert pick_dtype("auto", cuda, torch.float32) == torch.bfloat16
    assert pick_dtype("float32", cpu, torch.bfloat16) == torch.float32


def _weights(cfg: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.to(torch.bfloat16) for k, v in RetNet(RetNetConfig.from_dict(cfg)).state_dict().items()}


def test_tied_embeddings_load_without_lm_head(tmp_path: Path) -> None:
    cfg = fla_config(tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = _weights(cfg)
    weights.pop("lm_head.weight")
    write_sharded(weights, tmp_path)
    model = load_stored(tmp_path, mmap=True)
    assert model.lm_head.weight is model.model.embeddings.weight


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    cfg = fla_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = _weights(cfg)
    weights.pop("model.norm.weight")
    weights.pop("model.layers.1.attn.o_proj.weight")
    weights["model.layers.9.attn.q_proj.weight"] = torch.zeros(2, 2)
    write_sharded(weights, tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_stored(tmp_path)
    msg = str(e.value)
    assert "missing ['model.layers.1.attn.o_proj.weight', 'model.norm.weight']" in msg
    assert "unexpected ['model.layers.9.attn.q_proj.weight']" in msg


def test_bad_indexes_name_the_file(tmp_path: Path) -> None:
    cfg = fla_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_sharded(_weights(cfg), tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"model-00002-of-00002\.safetensors named in .*index.json is missing"
    ):
        load_stored(tmp_path)
    data["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="outside the directory"):
        load_stored(tmp_path)
    index.write_text("[]")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_stored(tmp_path)


def _raw_file(path: Path, header: dict, data: bytes) -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, "do not fit"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "do not fit"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, "shape"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            "overlap",
        ),
    ],
)
def test_malformed_safetensors_headers_are_errors(tmp_path: Path, header: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        map_safetensors(_raw_file(tmp_path / "w.safetensors", header, bytes(8)))


def test_mapped_reader_agrees_with_safetensors(tmp_path: Path) -> None:
    tensors = {
        "f": torch.randn(3, 5),
        "h": torch.randn(7).to(torch.bfloat16),
        "e": torch.zeros(0, 4),
        "i": torch.arange(5, dtype=torch.int64),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"))
    got = map_safetensors(tmp_path / "x.safetensors")
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    got["f"].add_(1)  # a private map: the file is never written
    assert torch.equal(map_safetensors(tmp_path / "x.safetensors")["f"], tensors["f"])


def test_fla_hub_config_keys_and_state_size() -> None:
    cfg = load_config_dict(fla_config(hidden_size=2048, num_hidden_layers=24, num_heads=8, vocab_size=32000))
    assert cfg.fingerprint_dict() == preset("1.3B").fingerprint_dict()
    assert cfg.extra["torch_dtype"] == "bfloat16" and cfg.extra["attn_mode"] == "fused_chunk"
    for name in ("1.3B", "2.7B", "tiny"):
        c = preset(name)
        assert c.state_nbytes() == RetentionState.empty(c, 1).nbytes
        assert c.state_nbytes(2) == RetentionState.empty(c, 1, dtype=torch.bfloat16).nbytes
    assert preset("1.3B").state_nbytes() == 24 * 8 * 256 * 512 * 4


def load_config_dict(data: dict) -> RetNetConfig:
    return RetNetConfig.from_dict(data)


def test_load_config_of_the_fixture(model_dir: Path) -> None:
    assert load_config(model_dir).max_position_embeddings == 2048


def test_bad_model_dirs_are_startup_errors(tmp_path: Path) -> None:
    from server.runtime import StartupError, load_model
    from server.settings import Settings

    d = build_hf_model(tmp_path / "m")
    loaded = load_model(Settings(model_path=d, device="cpu"))
    assert loaded.model.dtype == torch.bfloat16 and loaded.chat.template is not None
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(StartupError, match=r"RETSERVE_MODEL_PATH=.*tokenizer\.json"):
        load_model(Settings(model_path=d, device="cpu"))
    (d / "tokenizer.json").unlink()
    with pytest.raises(StartupError, match="has no tokenizer"):
        load_model(Settings(model_path=d, device="cpu"))
    (d / "model-00001-of-00002.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(
        StartupError, match=r"model-00001-of-00002\.safetensors is not a readable safetensors"
    ):
        load_model(Settings(model_path=d, device="cpu"))
