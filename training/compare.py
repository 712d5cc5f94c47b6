"""RetNet vs the Transformer baseline at matched size: loss curves at equal tokens, decode cost vs context.

`python -m training compare` trains both architectures with the same config, data, steps and seed,
then times greedy decoding after prompts of growing length, and writes `docs/compare.md` (a table)
and `docs/compare.png` (loss curves; decode ms/token vs context length).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.checkpoint import from_pretrained, load_baseline
from model.retnet import RetNet
from model.transformer import GPTBaseline, KVCache
from training.config import TrainConfig, absolute_path
from training.train import train


def _read_log(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train_pts, val_pts = [], []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "step" in r and "event" not in r:
            train_pts.append((r["step"], r["loss"]))
        if "val_loss" in r:
            val_pts.append((r["step"], r["val_loss"]))
    return train_pts, val_pts


@torch.inference_mode()
def decode_ms_per_token(model: nn.Module, context: int, steps: int = 32, repeats: int = 3) -> float:
    """Median ms per greedy decode step (batch 1) after a `context`-token prompt."""
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (1, context), generator=torch.Generator().manual_seed(context))
    runs = []
    for _ in range(repeats):
        if isinstance(model, RetNet):
            logits, state = model(prompt, logits_to_keep=1)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(steps):
                logits, state = model(tok, state=state)
                tok = logits[:, -1].argmax(-1, keepdim=True)
        else:
            assert isinstance(model, GPTBaseline)
            cache = KVCache.empty(model.config, 1, context + steps)
            logits, _ = model(prompt, cache, logits_to_keep=1)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(steps):
                logits, _ = model(tok, cache)
                tok = logits[:, -1].argmax(-1, keepdim=True)
        runs.append((time.perf_counter() - t0) * 1000 / steps)
    return statistics.median(runs)


def _plot(curves: dict[str, Any], decode: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arch, c in curves.items():
        ax1.plot([t for t, _ in c["train"]], [v for _, v in c["train"]], alpha=0.5, label=f"{arch} train")
        ax1.plot([t for t, _ in c["val"]], [v for _, v in c["val"]], marker="o", label=f"{arch} val")
    ax1.set_xlabel("tokens seen")
    ax1.set_ylabel("loss (nats)")
    ax1.set_title("Loss at equal parameters and tokens")
    ax1.legend()
    for arch, pts in decode.items():
        xs = sorted(pts)
        ax2.plot(xs, [pts[x] for x in xs], marker="o", label=arch)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("context length (tokens)")
    ax2.set_ylabel("decode ms/token (batch 1, CPU)")
    ax2.set_title("Decode cost vs context")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_comparison(
    config: str | Path, out_dir: Path, docs: Path, steps: int | None = None, contexts: list[int] | None = None
) -> dict[str, Any]:
    """Train both architectures on ``config`` and write the table and plot into ``docs``.

    Relative paths (the arguments and the config's directories) are taken below the working directory.
    """
    contexts = contexts or [128, 512, 2048, 8192]
    base = TrainConfig.from_yaml(config).resolved()
    out_dir, docs = absolute_path(out_dir), absolute_path(docs)
    results: dict[str, Any] = {"config": base.to_dict(), "archs": {}}
    curves: dict[str, Any] = {}
    decode: dict[str, dict[int, float]] = {}
    for arch in ("retnet", "transformer"):
        overrides = {"arch": arch, "out_dir": str(out_dir / arch)}
        if steps is not None:
            overrides["max_steps"] = steps
        cfg = TrainConfig.from_dict({**base.to_dict(), **overrides})
        log = Path(cfg.out_dir) / "log.jsonl"
        if log.exists():
            log.unlink()  # a fresh curve for this comparison
        t0 = time.time()
        last = train(cfg)
        wall = time.time() - t0
        tr, va = _read_log(log)
        per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        curves[arch] = {
            "train": [(s * per_step, v) for s, v in tr],
            "val": [(s * per_step, v) for s, v in va],
        }
        model_dir = Path(cfg.out_dir) / "model"
        model = from_pretrained(model_dir) if arch == "retnet" else load_baseline(model_dir)
        decode[arch] = {c: decode_ms_per_token(model, c) for c in contexts}
        results["archs"][arch] = {
            "params": sum(p.numel() for p in model.parameters()),
            "tokens": last.get("tokens_seen"),
            "final_train_loss": last.get("loss"),
            "final_val_loss": va[-1][1] if va else None,
            "train_wall_s": round(wall, 1),
            "decode_ms_per_token": decode[arch],
        }
    docs.mkdir(parents=True, exist_ok=True)
    _plot(curves, decode, docs / "compare.png")
    (docs / "compare.md").write_text(_table(results, contexts))
    (out_dir / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    return results["archs"]


def _table(results: dict[str, Any], contexts: list[int]) -> str:
    cfg = results["config"]
    a = results["archs"]
    lines = [
        "# RetNet vs Transformer baseline",
        "",
        "Written by `python -m training compare` (training/compare.py). Same data (the builtin corpus),",
        f"tokenizer, seed, optimiser and schedule; `{cfg['preset']}` presets of matched parameter count;",
        f"seq_len {cfg['seq_len']}, batch {cfg['batch_size']}×{cfg['grad_accum']}, {cfg['max_steps']} steps.",
        "Decode: batch 1, greedy, after a prompt of the given length, median of 3 runs of 32 steps, CPU.",
        "",
        "![loss curves and decode cost](compare.png)",
        "",
        "| | " + " | ".join(a) + " |",
        "|---|" + "---|" * len(a),
        "| parameters | " + " | ".join(f"{v['params']:,}" for v in a.values()) + " |",
        "| tokens seen | " + " | ".join(f"{v['tokens']:,}" for v in a.values()) + " |",
        "| final train loss | " + " | ".join(f"{v['final_train_loss']:.3f}" for v in a.values()) + " |",
        "| final val loss | " + " | ".join(f"{v['final_val_loss']:.3f}" for v in a.values()) + " |",
        "| training wall time (s) | " + " | ".join(f"{v['train_wall_s']}" for v in a.values()) + " |",
    ]
    for c in contexts:
        lines.append(
            f"| decode ms/token @ {c} | "
            + " | ".join(f"{v['decode_ms_per_token'][c]:.2f}" for v in a.values())
            + " |"
        )
    return "\n".join(lines) + "\n"
