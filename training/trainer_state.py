"""Training checkpoints without pickle: the model directory plus optimizer/scheduler/RNG/data state.

Layout of a checkpoint directory:
  config.json, model.safetensors, tokenizer files   the model directory (fp32 while training)
  trainer_state.safetensors                          optimizer moments and RNG states (tensors)
The data position needs no state: batches are drawn from generators seeded by (seed, step, rank).
  trainer_state.json                                 step, tokens seen, config, optimizer scalars
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.checkpoint import save_pretrained

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed (missing files or a different model/optimizer shape)."""


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = st
    return out


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    tokenizer_dir: Path | None = None,
) -> None:
    """Write the checkpoint to `path` atomically (a temp dir renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(model, tmp)  # type: ignore[arg-type]
    if tokenizer_dir is not None:
        for name in ("tokenizer.tiktoken", "tokenizer_meta.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
    tensors = _rng_tensors()
    scalars: list[dict[str, Any]] = []
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = optimizer.state.get(p, {})
        entry: dict[str, Any] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{i}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                entry[k] = v
        scalars.append(entry)
    save_file(tensors, str(tmp / STATE_TENSORS))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    doc = {**meta, "optimizer": {"param_groups": groups, "scalars": scalars, "num_params": len(params)}}
    (tmp / STATE_JSON).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if path.exists():
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model weights, optimizer state and RNG states in place; return the saved meta."""
    for name in (STATE_TENSORS, STATE_JSON, "model.safetensors"):
        if not (path / name).is_file():
            raise ResumeError(f"{path} is not a training checkpoint: {name} is missing")
    meta = json.loads((path / STATE_JSON).read_text())
    weights = load_file(str(path / "model.safetensors"))
    own = model.state_dict()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        own.pop("lm_head.weight", None)
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        raise ResumeError(f"the model in {path} does not match the configured model")
    model.load_state_dict(weights, strict=False)
    tensors = load_file(str(path / STATE_TENSORS))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    opt_meta = meta["optimizer"]
    if opt_meta["num_params"] != len(params):
        raise ResumeError(f"optimizer has {len(params)} parameters, the checkpoint {opt_meta['num_params']}")
    for i, p in enumerate(params):
        st: dict[str, Any] = dict(opt_meta["scalars"][i])
        prefix = f"opt.{i}."
        for k, v in tensors.items():
            if k.startswith(prefix):
                st[k[len(prefix) :]] = v.to(p.device)
        if st:
            optimizer.state[p] = st
    for g, saved in zip(optimizer.param_groups, opt_meta["param_groups"], strict=True):
        g.update({k: v for k, v in saved.items() if k in g})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return meta
