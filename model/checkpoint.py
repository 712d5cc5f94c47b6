"""Checkpoint I/O: a directory with `config.json`, safetensors weights (fla's layout) and the tokenizer.

Weights are only ever read with safetensors (never pickle). Both of fla's MLP layouts load: separate
`mlp.gate_proj` / `mlp.up_proj`, and the older fused `mlp.gate_proj.weight` of shape [2I, D] (gate rows
first, then up). Sharded checkpoints (`model.safetensors.index.json`) load too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from model.config import RetNetConfig
from model.retnet import RetNet
from model.transformer import GPTBaseline, TransformerConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Buffers some fla exports carry that this implementation recomputes.
_IGNORED = re.compile(r".*\.rotary\.(inv_freq|cos_cached|sin_cached|scale)$")
_FUSED_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$")


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or holds weights that do not fit its config."""


def save_pretrained(
    model: RetNet | GPTBaseline,
    path: str | Path,
    tokenizer: object | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config.json, model.safetensors (optionally cast to `dtype`) and the tokenizer files."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(model.config.to_json() + "\n")
    tensors: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().to("cpu")
        tensors[name] = (t.to(dtype) if dtype is not None else t).contiguous()
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(out)  # type: ignore[attr-defined]
    return out


def _read_tensors(path: Path) -> dict[str, Tensor]:
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map')") from e
        files = sorted({path / f for f in weight_map.values()})
    else:
        pickled = [p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (
            f" (found {pickled}: pickled weights are refused; convert them to safetensors)" if pickled else ""
        )
        raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path}{hint}")
    tensors: dict[str, Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"weight shard {f} named in the index is missing")
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    tensors[k] = fh.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from e
    return tensors


def convert_fla_state_dict(tensors: dict[str, Tensor], config: RetNetConfig) -> dict[str, Tensor]:
    """Map an fla RetNet state dict onto this module's names (split the fused MLP, drop buffers)."""
    out: dict[str, Tensor] = {}
    I, D = config.ffn_size, config.hidden_size
    for name, t in tensors.items():
        if _IGNORED.match(name):
            continue
        m = _FUSED_MLP.match(name)
        up_name = f"model.layers.{m.group(1)}.mlp.up_proj.weight" if m else ""
        if m and up_name not in tensors:
            if tuple(t.shape) != (2 * I, D):
                raise CheckpointError(
                    f"{name} has shape {tuple(t.shape)}; the fused MLP layout needs {(2 * I, D)} "
                    f"and the split layout needs an up_proj beside it"
                )
            out[name], out[up_name] = t[:I].clone(), t[I:].clone()
            continue
        out[name] = t
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def load_weights(model: RetNet, tensors: dict[str, Tensor]) -> None:
    """Load an fla-layout state dict into `model`, with errors that name every bad key."""
    sd = convert_fla_state_dict(tensors, model.config)
    own = model.state_dict()
    if model.config.tie_word_embeddings:
        own.pop("lm_head.weight", None)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not match the config: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for name, t in sd.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{name} has shape {tuple(t.shape)}, the config needs {tuple(own[name].shape)}"
            )
        if not t.is_floating_point():
            raise CheckpointError(f"{name} has dtype {t.dtype}; weights must be floating point")
    model.load_state_dict(sd, strict=not model.config.tie_word_embeddings)


def load_config(path: str | Path) -> RetNetConfig:
    p = Path(path)
    if not (p / CONFIG_NAME).is_file():
        raise CheckpointError(f"{p} is not a model directory: it has no {CONFIG_NAME}")
    return RetNetConfig.from_json_file(p / CONFIG_NAME)


def load_baseline(path: str | Path, device: torch.device | str = "cpu") -> GPTBaseline:
    """Load a Transformer-baseline model directory (written by save_pretrained)."""
    p = Path(path)
    try:
        config = TransformerConfig.from_dict(json.loads((p / CONFIG_NAME).read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p / CONFIG_NAME} is missing or not JSON: {e}") from e
    model = GPTBaseline(config)
    sd = _read_tensors(p)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["embeddings.weight"]
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {p} do not fit its config: {e}") from e
    return model.to(device).eval()


def from_pretrained(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> RetNet:
    """Load a model directory. dtype None keeps float32 (weights stored in fp16/bf16 are upcast)."""
    p = Path(path)
    config = load_config(p)
    tensors = _read_tensors(p)
    with torch.device("meta"):
        model = RetNet(config)
    model = model.to_empty(device="cpu")
    load_weights(model, tensors)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embeddings.weight
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def load_tokenizer(path: str | Path):  # -> Tokenizer
    """The tokenizer shipped in a model directory."""
    from model.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)
