"""Checkpoints in fla's layout load and reproduce logits computed independently from the spec."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import CheckpointError, from_pretrained, load_tokenizer, save_pretrained
from model.config import ConfigError, RetNetConfig, preset
from model.retnet import RetNet
from tests.support.hf_model import fla_config

# An fla-style config.json, as fla's RetNetConfig writes it (fields we ignore included), at other test
# dimensions than the fla-hub fixture (3 heads, an odd vocabulary).
FLA_CONFIG = fla_config(attn_mode="chunk", num_heads=3, hidden_size=48, vocab_size=97)


def _fla_weights(cfg: dict, fused_mlp: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under fla's parameter names, shapes derived here from the spec."""
    g = torch.Generator().manual_seed(seed)
    D, H, V = cfg["hidden_size"], cfg["num_heads"], cfg["vocab_size"]
    Kd, Vd = int(D * cfg["expand_k"]), int(D * cfg["expand_v"])
    inter = 256 * math.ceil(int(D * cfg["hidden_ratio"] * 2 / 3) / 256)

    def w(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    def norm(n):
        return 1 + 0.2 * torch.randn(n, generator=g)

    t = {"model.embeddings.weight": w(V, D, std=1.0), "model.norm.weight": norm(D), "lm_head.weight": w(V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "attn_norm.weight"] = norm(D)
        t[p + "mlp_norm.weight"] = norm(D)
        t[p + "attn.q_proj.weight"] = w(Kd, D)
        t[p + "attn.k_proj.weight"] = w(Kd, D)
        t[p + "attn.v_proj.weight"] = w(Vd, D)
        t[p + "attn.g_proj.weight"] = w(Vd, D)
        t[p + "attn.o_proj.weight"] = w(D, Vd)
        t[p + "attn.g_norm_swish_gate.weight"] = norm(Vd // H)
        gate, up = w(inter, D), w(inter, D)
        if fused_mlp:
            t[p + "mlp.gate_proj.weight"] = torch.cat([gate, up], 0)
        else:
            t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = gate, up
        t[p + "mlp.down_proj.weight"] = w(D, inter)
    return t


def _spec_logits(cfg: dict, t: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Logits straight from the issue's spec, written independently of model/ (float64, one sequence)."""
    f = {k: v.double() for k, v in t.items()}
    D, H = cfg["hidden_size"], cfg["num_heads"]
    dk, dv = int(D * cfg["expand_k"]) // H, int(D * cfg["expand_v"]) // H
    inter = 256 * math.ceil(int(D * cfg["hidden_ratio"] * 2 / 3) / 256)
    eps = cfg["norm_eps"]
    T = len(ids)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def rope(x):  # x (T, H, dk): pair dim i with dim i + dk/2, rotate by pos * 10000^(-2i/dk)
        half = dk // 2
        theta = torch.tensor([10000.0 ** (-2 * i / dk) for i in range(half)], dtype=torch.float64)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * theta  # (T, half)
        z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(ang), ang)[:, None, :]
        return torch.cat([z.real, z.imag], -1)

    x = f["model.embeddings.weight"][ids]  # (T, D)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, f[p + "attn_norm.weight"])
        q = rope((h @ f[p + "attn.q_proj.weight"].T).view(T, H, dk)) * dk**-0.5
        k = rope((h @ f[p + "attn.k_proj.weight"].T).view(T, H, dk))
        v = (h @ f[p + "attn.v_proj.weight"].T).view(T, H, dv)
        g = (h @ f[p + "attn.g_proj.weight"].T).view(T, H, dv)
        heads = []
        for hh in range(H):
            gamma = 1 - 2.0 ** (-5 - hh)
            Dm = torch.tensor(
                [[gamma ** (a - b) if a >= b else 0.0 for b in range(T)] for a in range(T)],
                dtype=torch.float64,
            )
            heads.append(((q[:, hh] @ k[:, hh].T) * Dm) @ v[:, hh])  # (T, dv)
        o = torch.stack(heads, 1)  # (T, H, dv)
        o = rms(o, f[p + "attn.g_norm_swish_gate.weight"]) * (g * torch.sigmoid(g))
        x = x + o.reshape(T, H * dv) @ f[p + "attn.o_proj.weight"].T
        h = rms(x, f[p + "mlp_norm.weight"])
        gu = f[p + "mlp.gate_proj.weight"]
        if p + "mlp.up_proj.weight" in f:
            gate, up = h @ gu.T, h @ f[p + "mlp.up_proj.weight"].T
        else:
            gate, up = h @ gu[:inter].T, h @ gu[inter:].T
        x = x + (torch.nn.functional.silu(gate) * up) @ f[p + "mlp.down_proj.weight"].T
    return rms(x, f["model.norm.weight"]) @ f["lm_head.weight"].T


@pytest.mark.parametrize("fused_mlp", [False, True], ids=["split-mlp", "fused-mlp"])
def test_fla_layout_checkpoint_reproduces_spec_logits(tmp_path, fused_mlp):
    weights = _fla_weights(FLA_CONFIG, fused_mlp)
    (tmp_path / "config.json").write_text(json.dumps(FLA_CONFIG))
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    weights = {k: v.to(torch.bfloat16).double() for k, v in weights.items()}  # what the file holds

    model = from_pretrained(tmp_path, dtype=torch.float64)
    assert model.config.bos_token_id == 1 and model.config.extra["attn_mode"] == "chunk"
    ids = torch.randint(0, FLA_CONFIG["vocab_size"], (40,), generator=torch.Generator().manual_seed(3))
    expected = _spec_logits(FLA_CONFIG, weights, ids.tolist())
    with torch.inference_mode():
        for mode in ("parallel", "chunk", "recurrent"):
            logits, _ = model(ids[None], mode=mode, chunk_size=16)
            assert (logits[0] - expected).abs().max().item() < 1e-9, mode


def test_sharded_checkpoint_loads(tmp_path):
    weights = _fla_weights(FLA_CONFIG, fused_mlp=False)
    (tmp_path / "config.json").write_text(json.dumps(FLA_CONFIG))
    names = sorted(weights)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for fname, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(tmp_path / fname))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = from_pretrained(tmp_path)
    torch.testing.assert_close(model.lm_head.weight, weights["lm_head.weight"], rtol=0, atol=0)


def test_save_and_load_round_trip_bit_exact(tmp_path):
    from tests.support.bpe import make_test_tokenizer

    torch.manual_seed(0)
    model = RetNet(preset("tiny")).eval()
    tok = make_test_tokenizer()
    save_pretrained(model, tmp_path, tokenizer=tok)
    loaded = from_pretrained(tmp_path)
    ids = torch.randint(0, 512, (2, 33))
    with torch.inference_mode():
        a, sa = model(ids)
        b, sb = loaded(ids)
    assert torch.equal(a, b)
    assert sa.equal(sb)
    assert loaded.config == model.config
    tok2 = load_tokenizer(tmp_path)
    text = "Hello, wörld! 你好 🙂"
    assert tok2.encode(text) == tok.encode(text)
    assert tok2.decode(tok2.encode(text)) == text


def test_half_precision_save(tmp_path):
    model = RetNet(preset("tiny")).eval()
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    loaded = from_pretrained(tmp_path)
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())


def test_tied_embeddings_round_trip(tmp_path):
    model = RetNet(preset("tiny", tie_word_embeddings=True)).eval()
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embeddings.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_config_json_is_fla_compatible():
    cfg = preset("small")
    d = json.loads(cfg.to_json())
    for key in ("hidden_size", "num_hidden_layers", "num_heads", "expand_k", "expand_v", "hidden_ratio"):
        assert key in d
    assert d["model_type"] == "retnet" and d["architectures"] == ["RetNetForCausalLM"]
    assert RetNetConfig.from_dict(d) == cfg


def test_presets_match_fla_hub_shapes():
    c13, c27 = preset("1.3B"), preset("2.7B")
    assert (c13.hidden_size, c13.num_hidden_layers, c13.head_k_dim, c13.head_v_dim) == (2048, 24, 256, 512)
    assert c13.ffn_size == 2816
    assert (c27.hidden_size, c27.num_hidden_layers, c27.head_k_dim) == (2560, 32, 256)
    with torch.device("meta"):
        assert abs(RetNet(c13).num_parameters() - 1.36e9) < 0.05e9
        assert abs(RetNet(c27).num_parameters() - 2.72e9) < 0.05e9


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_heads": 5}, "divisible"),
        ({"num_kv_heads": 2}, "num_kv_heads"),
        ({"model_type": "llama"}, "model_type"),
        ({"use_short_conv": True}, "use_short_conv"),
        ({"eos_token_id": 10_000}, "eos_token_id"),
    ],
)
def test_bad_configs_raise_clear_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        RetNetConfig.from_dict({**FLA_CONFIG, **bad})


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(FLA_CONFIG))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled"):
        from_pretrained(tmp_path)
    weights = _fla_weights(FLA_CONFIG, fused_mlp=False)
    weights.pop("model.norm.weight")
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \['model.norm.weight'\]"):
        from_pretrained(tmp_path)
    weights = _fla_weights({**FLA_CONFIG, "hidden_size": 24}, fused_mlp=False)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shape"):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="safetensors"):
        from_pretrained(tmp_path)
