"""Turn a training run into a shipped model directory: half-precision weights, tokenizer, model card.

    python -m training export --run runs/small --out checkpoints/retserve-small

The card records the exact training command and config, the data manifest, tokens seen, wall time,
hardware, final train/validation loss (validation measured here on the exported weights) and samples.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import from_pretrained, load_tokenizer, save_pretrained
from training.data import load_tokens
from training.evaluate import eval_loss, sample_text

SAMPLE_PROMPTS = [
    "The ",
    "And the LORD said unto",
    "ROMEO.",
    "Call me Ishmael.",
    "Fellow-citizens of the Senate",
]


def _log_records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def export_run(
    run: Path,
    out: Path,
    dtype: str = "bfloat16",
    command: str | None = None,
    eval_batches: int | None = None,
) -> dict[str, Any]:
    """Write `out` from `run`/model; returns the card's figures.

    The exported weights' validation loss is measured on the whole validation split, or on its first
    ``eval_batches`` batches of 16 windows (the card records how many tokens it read).
    """
    if eval_batches is not None and eval_batches < 1:
        raise ValueError(f"eval_batches must be a positive number of batches, got {eval_batches}")
    model_dir = run / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no model yet: the run has not finished")
    cfg = json.loads((run / "train_config.json").read_text())
    records = _log_records(run)
    steps = [r for r in records if "loss" in r and "event" not in r]
    evals = [r for r in records if "val_loss" in r and "event" not in r]
    if not steps:
        raise ValueError(f"{run / 'log.jsonl'} has no training steps")
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    model = from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    if out.exists():
        shutil.rmtree(out)
    save_pretrained(model, out, tokenizer=tok, dtype=torch_dtype)
    shipped = from_pretrained(out)  # what users get: weights rounded to `dtype`, computed in float32
    data_dir = Path(cfg["data_dir"])
    val = eval_loss(shipped, load_tokens(data_dir, "val"), cfg["seq_len"], 16, eval_batches)
    samples = {p: sample_text(shipped, tok, p, 60, seed=0) for p in SAMPLE_PROMPTS}
    tokens_meta = json.loads((data_dir / "tokens.json").read_text())
    manifest_path = Path(tokens_meta.get("corpus_dir", data_dir.parent)) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    figures = {
        "params": shipped.num_parameters(),
        "weights_dtype": dtype,
        "weights_bytes": (out / "model.safetensors").stat().st_size,
        "steps": steps[-1]["step"],
        "tokens_seen": steps[-1]["tokens_seen"],
        "wall_time_s": round(steps[-1]["elapsed_s"], 1),
        "final_train_loss": round(sum(r["loss"] for r in steps[-10:]) / len(steps[-10:]), 4),
        "final_val_loss_during_training": evals[-1]["val_loss"] if evals else None,
        "val_loss_exported": round(val["loss"], 4),
        "val_tokens": val["tokens"],
        "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    (out / "training_summary.json").write_text(
        json.dumps(
            {"figures": figures, "train_config": cfg, "tokens": tokens_meta, "corpus": manifest}, indent=2
        )
        + "\n"
    )
    (out / "README.md").write_text(_card(figures, cfg, tokens_meta, manifest, samples, evals, command))
    return figures


def _card(
    f: dict[str, Any],
    cfg: dict[str, Any],
    tokens: dict[str, Any],
    manifest: dict[str, Any],
    samples: dict[str, str],
    evals: list[dict[str, Any]],
    command: str | None,
) -> str:
    sources = manifest.get("sources", [])
    src_lines = [
        f"| {s.get('name')} | `{s.get('package')}` | {s.get('size', '')} | `{str(s.get('sha256'))[:16]}…` |"
        for s in sources
        if isinstance(s, dict)
    ]
    curve = " → ".join(f"{r['val_loss']:.2f}@{r['step']}" for r in evals)
    lines = [
        "# retserve-small",
        "",
        "The default model that `retserve` serves: a RetNet (fla architecture, `small` preset) trained from",
        "scratch on this repository's builtin public-domain corpus (Shakespeare, the King James Bible,",
        "State of the Union addresses 1790–2016, Moby-Dick). It is a small demonstration model: it writes",
        "text in the style of its corpus, not facts.",
        "",
        "## Figures",
        "",
        "| | (losses in nats) |",
        "|---|---|",
        f"| parameters | {f['params']:,} |",
        f"| weights | {f['weights_dtype']} safetensors, {f['weights_bytes'] / 1e6:.1f} MB |",
        f"| steps | {f['steps']} |",
        f"| tokens seen | {f['tokens_seen']:,} |",
        f"| wall time | {f['wall_time_s'] / 60:.1f} min |",
        f"| hardware | {f['hardware']} |",
        f"| final train loss (mean of last 10 steps) | {f['final_train_loss']:.3f} nats |",
        f"| validation loss, fp32 weights, last evaluation | {f['final_val_loss_during_training']:.3f} |",
        f"| **validation loss of these {f['weights_dtype']} weights** | **{f['val_loss_exported']:.3f}** "
        f"({f['val_tokens']:,} held-out tokens) |",
        "",
        f"Validation loss during training (nats@step): {curve}",
        "",
        "## How it was made",
        "",
        "```bash",
        "python -m training prepare builtin",
        "python -m training train-tokenizer --vocab-size 8192",
        "python -m training tokenize",
        command or "python -m training train --config small",
        "python -m training export --run runs/small --out checkpoints/retserve-small",
        "```",
        "",
        "Training config (`train_config.json` of the run):",
        "",
        "```json",
        json.dumps(cfg, indent=2),
        "```",
        "",
        "## Data",
        "",
        f"Tokenizer: byte-level BPE, {tokens.get('vocab_size')} tokens, `<|endoftext|>` separates documents.",
        f"Train tokens: {tokens.get('splits', {}).get('train', {}).get('tokens', '?'):,}; validation tokens: "
        f"{tokens.get('splits', {}).get('val', {}).get('tokens', '?'):,} (whole documents held out).",
        "",
        "| source | package | bytes | sha256 |",
        "|---|---|---|---|",
        *src_lines,
        "",
        "## Samples (temperature 0.8, top-k 40, seed 0)",
        "",
    ]
    for prompt, text in samples.items():
        lines += [f"**{prompt}**", "", "> " + text.replace("\n", "\n> "), ""]
    return "\n".join(lines) + "\n"
