"""Checkpoint I/O: a directory with `config.json`, safetensors weights (fla's layout) and the tokenizer.

Weights are only ever read with safetensors (never pickle). Both of fla's MLP layouts load: separate
`mlp.gate_proj` / `mlp.up_proj`, and the older fused `mlp.gate_proj.weight` of shape [2I, D] (gate rows
first, then up). Sharded checkpoints (`model.safetensors.index.json`) load too.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from model.config import RetNetConfig
from model.mmap_safetensors import MMAP_MIN_BYTES, map_safetensors
from model.retnet import RetNet
from model.tokenizer import TextTokenizer
from model.tokenizer import load_tokenizer as _load_tokenizer
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
    # a new file renamed over the old one: a model mapped from the old file keeps its pages
    tmp = out / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_NAME)
    if tokenizer is not None:
        tokenizer.save(out)  # type: ignore[attr-defined]
    return out


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: `model.safetensors` or the shards its index names."""
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = {str(f) for f in weight_map.values()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map')") from e
        bad = sorted(n for n in names if Path(n).name != n)
        if bad:
            raise CheckpointError(f"{index} names shards outside the directory: {bad[:4]}")
        files = sorted(path / n for n in names)
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"weight shard {f} named in {index} is missing")
        return files
    pickled = [p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    hint = f" (found {pickled}: pickled weights are refused; convert them to safetensors)" if pickled else ""
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path}{hint}")


def _read_tensors(path: Path, mmap: bool | None = None) -> dict[str, Tensor]:
    """Every tensor of a model directory. `mmap` (default: for checkpoints over MMAP_MIN_BYTES) maps the
    files and returns views of them: no copy is made, pages are read as the weights are first used."""
    files = weight_files(path)
    if mmap is None:
        mmap = sum(f.stat().st_size for f in files) >= MMAP_MIN_BYTES
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            part = map_safetensors(f) if mmap else _copy_safetensors(f)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from e
        dup = sorted(set(part) & set(tensors))
        if dup:
            raise CheckpointError(f"{f} repeats tensors of another shard: {dup[:4]}")
        tensors.update(part)
    return tensors


def _copy_safetensors(f: Path) -> dict[str, Tensor]:
    with safe_open(str(f), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__


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
            out[name], out[up_name] = t[:I], t[I:]  # views: no copy of a mapped file
            continue
        out[name] = t
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def load_weights(model: RetNet, tensors: dict[str, Tensor], assign: bool = False) -> None:
    """Load an fla-layout state dict into `model`, with errors that name every bad key. `assign` makes
    the tensors themselves the model's parameters (no copy; for a model built on the meta device)."""
    sd = convert_fla_state_dict(tensors, model.config)
    own = model.state_dict()
    if model.config.tie_word_embeddings:
        own.pop("lm_head.weight", None)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not match the config: missing {_names(missing)}, unexpected {_names(unexpected)}"
        )
    for name, t in sd.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{name} has shape {tuple(t.shape)}, the config needs {tuple(own[name].shape)}"
            )
        if not t.is_floating_point():
            raise CheckpointError(f"{name} has dtype {t.dtype}; weights must be floating point")
    model.load_state_dict(sd, strict=not model.config.tie_word_embeddings, assign=assign)


def _names(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


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


def stored_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype a model directory's weights are stored in (`torch_dtype` of config.json), if it says."""
    name = load_config(path).extra.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def load_stored(path: str | Path, mmap: bool | None = None) -> RetNet:
    """A model directory's RetNet on the CPU, its parameters the tensors exactly as stored (any dtype;
    memory-mapped for large checkpoints, see `_read_tensors`): no float32 copy of the whole model (the
    server fingerprints these weights as float32 one at a time: `server.runtime.float32_fingerprint`)."""
    p = Path(path)
    config = load_config(p)
    tensors = _read_tensors(p, mmap)
    with torch.device("meta"):
        model = RetNet(config)
    load_weights(model, tensors, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embeddings.weight
    unset = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not unset, f"tensors left on the meta device: {unset}"  # load_weights checked every name
    return model.eval()


def from_pretrained(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    mmap: bool | None = None,
) -> RetNet:
    """Load a model directory. dtype None keeps float32 (weights stored in fp16/bf16 are upcast)."""
    model = load_stored(path, mmap)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer of a model directory (tiktoken or Hugging Face `tokenizer.json`)."""
    return _load_tokenizer(path)
