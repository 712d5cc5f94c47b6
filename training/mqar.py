"""Synthetic multi-query associative recall (MQAR, as in Zoology / Based) for small recall models.

One example is a *context* of key-value pairs (optionally with noise tokens between pairs) followed
by *queries*: each query is one of the context's keys and the token after it is that key's value::

    context  BOS k1 v1 [n n] k2 v2 [n n] ... kP vP
    queries  SEP q1 a1 q2 a2 ... qQ aQ EOS          (q_i a key of the context, a_i its value)

Token ids: 0 = BOS, 1 = SEP, 2 = EOS, then `num_keys` key ids, `num_values` value ids and
`num_noise` noise ids. Keys within one example are distinct; queries are distinct keys in random order.

`layout="fused"` writes each context pair as ONE token (one of num_keys * num_values pair ids, after
the noise ids) instead of `k v`: the model then needs no previous-token mixing to bind a key to its
value (a RetNet, which has no short convolution, learns that binding slowly), only the recall itself.
Queries are the same (`q a`, a key id then a value id).

Training data is written as the token shards the training loop reads (``train.bin``, ``val.bin``,
``tokens.json``: see training/data.py), a flat stream of whole examples, plus ``train.mask.bin`` /
``val.mask.bin`` (uint8 per token, 1 = an answer): the loop computes the loss on answers only::

    python -m training.mqar data --out /abs/data/mqar
    python -m training train --config tiny --set data_dir=/abs/data/mqar tokenizer_dir=/abs/data/mqar \\
        out_dir=/abs/runs/recall model_overrides='{hidden_size: 128, num_hidden_layers: 2, ...}'
    python -m training.mqar eval --model /abs/runs/recall/model
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.retnet import RetNet
from model.state import RetentionState
from training.data import FORMAT_VERSION, TOKENS_FILE, token_dtype
from training.sources import atomic_write_bytes

BOS, SEP, EOS = 0, 1, 2
NUM_SPECIAL = 3


class MQARError(ValueError):
    """An MQAR specification or request is invalid."""


@dataclass(frozen=True)
class MQARSpec:
    """The token space and the shape of examples."""

    num_keys: int = 64
    num_values: int = 64
    num_noise: int = 32
    num_pairs: int = 16
    num_queries: int | None = None  # None = num_pairs (every pair is asked for once)
    layout: str = "standard"  # "standard" (k v in the context) or "fused" (one pair token)

    def __post_init__(self) -> None:
        for name in ("num_keys", "num_values", "num_pairs"):
            if getattr(self, name) < 1:
                raise MQARError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_noise < 0:
            raise MQARError(f"num_noise must be >= 0, got {self.num_noise}")
        if self.num_pairs > self.num_keys:
            raise MQARError(f"num_pairs ({self.num_pairs}) cannot exceed num_keys ({self.num_keys})")
        if self.layout not in ("standard", "fused"):
            raise MQARError(f"layout must be 'standard' or 'fused', got {self.layout!r}")
        if not 1 <= self.queries <= self.num_pairs:
            raise MQARError(f"num_queries must be in [1, num_pairs={self.num_pairs}], got {self.num_queries}")

    @property
    def queries(self) -> int:
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def first_key(self) -> int:
        return NUM_SPECIAL

    @property
    def first_value(self) -> int:
        return NUM_SPECIAL + self.num_keys

    @property
    def first_noise(self) -> int:
        return NUM_SPECIAL + self.num_keys + self.num_values

    @property
    def first_pair(self) -> int:
        return self.first_noise + self.num_noise

    @property
    def tokens_per_pair(self) -> int:
        return 1 if self.layout == "fused" else 2

    @property
    def vocab_size(self) -> int:
        fused = self.num_keys * self.num_values if self.layout == "fused" else 0
        return NUM_SPECIAL + self.num_keys + self.num_values + self.num_noise + fused

    def pair_tokens(self, key: int, value: int) -> list[int]:
        """How the context writes one pair: [k, v], or [pair id] in the fused layout."""
        if self.layout == "fused":
            return [self.first_pair + (key - self.first_key) * self.num_values + (value - self.first_value)]
        return [key, value]

    def is_key(self, token: int) -> bool:
        return self.first_key <= token < self.first_value

    def is_value(self, token: int) -> bool:
        return self.first_value <= token < self.first_noise


@dataclass
class MQARExample:
    """One example: `pairs` (key, value) in context order, `context` and `queries` token ids."""

    pairs: list[tuple[int, int]]
    context: list[int]  # BOS, then the pairs (and noise)
    is_noise: list[bool]  # per context token: True for a noise token
    queries: list[int]  # SEP q1 a1 ... qQ aQ (no EOS)

    @property
    def answer_positions(self) -> list[int]:
        """Indices i into `queries` whose next token queries[i + 1] is an answer."""
        return list(range(1, len(self.queries), 2))

    @property
    def tokens(self) -> list[int]:
        """The whole example as the training stream holds it."""
        return self.context + self.queries + [EOS]


def noise_count(pair_tokens: int, noise_ratio: float) -> int:
    """Noise tokens that make `noise_ratio` of the pair tokens plus noise: n * r / (1 - r)."""
    if not 0.0 <= noise_ratio < 1.0:
        raise MQARError(f"noise_ratio must be in [0, 1), got {noise_ratio}")
    return round(pair_tokens * noise_ratio / (1.0 - noise_ratio))


def make_example(
    spec: MQARSpec,
    rng: np.random.Generator,
    noise_ratio: float = 0.0,
    num_pairs: int | None = None,
) -> MQARExample:
    """A random example; `noise_ratio` of the context's pair+noise tokens are noise, placed between pairs."""
    p = spec.num_pairs if num_pairs is None else num_pairs
    if not 1 <= p <= spec.num_keys:
        raise MQARError(f"num_pairs must be in [1, num_keys={spec.num_keys}], got {p}")
    n_noise = noise_count(p * spec.tokens_per_pair, noise_ratio)
    if n_noise and spec.num_noise == 0:
        raise MQARError("noise_ratio > 0 needs a spec with num_noise > 0")
    keys = rng.choice(spec.num_keys, size=p, replace=False) + spec.first_key
    values = rng.integers(0, spec.num_values, size=p) + spec.first_value
    pairs = [(int(k), int(v)) for k, v in zip(keys, values, strict=True)]
    # Noise tokens go into the p + 1 gaps around pairs (after BOS, between pairs, at the end).
    gaps = np.bincount(rng.integers(0, p + 1, size=n_noise), minlength=p + 1) if n_noise else np.zeros(p + 1)
    context, is_noise = [BOS], [False]
    for i in range(p + 1):
        for _ in range(int(gaps[i])):
            context.append(int(rng.integers(0, spec.num_noise)) + spec.first_noise)
            is_noise.append(True)
        if i < p:
            written = spec.pair_tokens(*pairs[i])
            context += written
            is_noise += [False] * len(written)
    q = min(spec.queries, p)
    asked = rng.permutation(p)[:q]
    queries = [SEP]
    for i in asked:
        queries += list(pairs[int(i)])
    return MQARExample(pairs, context, is_noise, queries)


def make_examples(
    spec: MQARSpec, n: int, seed: int, noise_ratio: float = 0.0, num_pairs: int | None = None
) -> list[MQARExample]:
    """`n` examples from a generator seeded by `seed` (the same seed gives the same examples)."""
    rng = np.random.default_rng(seed)
    return [make_example(spec, rng, noise_ratio, num_pairs) for _ in range(n)]


def training_stream(
    spec: MQARSpec, n: int, seed: int, noise_ratios: Sequence[float] = (0.0, 0.5), min_pairs: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """`n` whole examples back to back (each ends in EOS): pair counts uniform in [min_pairs,
    num_pairs], noise ratio drawn from `noise_ratios`, so a model learns to skip noise tokens.

    Returns the token ids and a loss mask (uint8, same length): 1 on the answers only. The other
    tokens are random by construction; their loss gradients drown the recall signal (with the mask a
    small model learns recall in hundreds of steps, without it not in a thousand)."""
    if not 1 <= min_pairs <= spec.num_pairs:
        raise MQARError(f"min_pairs must be in [1, num_pairs={spec.num_pairs}], got {min_pairs}")
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    mask: list[int] = []
    for _ in range(n):
        p = int(rng.integers(min_pairs, spec.num_pairs + 1))
        r = float(noise_ratios[int(rng.integers(0, len(noise_ratios)))])
        ex = make_example(spec, rng, r, p)
        answers = {len(ex.context) + i + 1 for i in ex.answer_positions}
        mask += [int(i in answers) for i in range(len(ex.tokens))]
        ids += ex.tokens
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def write_token_dir(
    out_dir: str | Path,
    spec: MQARSpec,
    train_examples: int = 40_000,
    val_examples: int = 1_000,
    seed: int = 0,
    noise_ratios: Sequence[float] = (0.0, 0.5),
    min_pairs: int = 1,
) -> dict[str, Any]:
    """Write ``train.bin``, ``val.bin``, ``tokens.json`` (the training loop's input); return the metadata."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(spec.vocab_size)
    splits: dict[str, Any] = {}
    for split, n, s in (("train", train_examples, seed), ("val", val_examples, seed + 1_000_003)):
        if n < 1:
            raise MQARError(f"{split} needs at least one example, got {n}")
        ids, mask = training_stream(spec, n, s, noise_ratios, min_pairs)
        atomic_write_bytes(out / f"{split}.bin", ids.astype(dtype).tobytes())
        atomic_write_bytes(out / f"{split}.mask.bin", mask.tobytes())  # read by training/train.py
        splits[split] = {"file": f"{split}.bin", "docs": n, "tokens": int(ids.size)}
    meta = {
        "format": "retserve-tokens",
        "version": FORMAT_VERSION,
        "created_by": "training.mqar",
        "dtype": dtype.name,
        "separator_id": EOS,
        "separator_token": "<eos>",
        "vocab_size": spec.vocab_size,
        "mqar": {
            **asdict(spec),
            "seed": seed,
            "noise_ratios": list(noise_ratios),
            "min_pairs": min_pairs,
        },
        "splits": splits,
    }
    atomic_write_bytes(out / TOKENS_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return meta


# ---------------------------------------------------------------------------- evaluation


def _batch(rows: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise MQARError(f"rows of one batch must have equal lengths, got {sorted(lengths)}")
    return torch.tensor([list(r) for r in rows], dtype=torch.long, device=device)  # (B, T)


@torch.inference_mode()
def answer_hits(model: RetNet, state: RetentionState, examples: Sequence[MQARExample]) -> Tensor:
    """Greedy hits (B, Q) bool: after `state` (the examples' contexts, already read), feed each
    example's queries (teacher-forced) and compare the argmax after every query key with its value."""
    if state.batch_size != len(examples):
        raise MQARError(f"state has {state.batch_size} rows for {len(examples)} examples")
    q = _batch([e.queries for e in examples], model.device)  # (B, 1 + 2Q)
    logits, _ = model(q, state=state.clone())  # (B, 1 + 2Q, V)
    pos = torch.tensor(examples[0].answer_positions, device=model.device)  # (Q,)
    pred = logits[:, pos].argmax(-1)  # (B, Q)
    return pred == q[:, pos + 1]


@torch.inference_mode()
def read_contexts(
    model: RetNet, examples: Sequence[MQARExample], keep: Tensor | None = None
) -> RetentionState:
    """The state after reading every example's context in one sequence (optionally with `keep` (B, T))."""
    x = _batch([e.context for e in examples], model.device)  # (B, T)
    _, state = model(x, keep=keep)
    return state


def recall_accuracy(model: RetNet, examples: Sequence[MQARExample], batch_size: int = 64) -> float:
    """Fraction of queries answered correctly when each example is read in one sequence."""
    hits = total = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        h = answer_hits(model, read_contexts(model, chunk), chunk)
        hits, total = hits + int(h.sum()), total + h.numel()
    return hits / total


# ---------------------------------------------------------------------------- export


MQAR_CARD = "mqar.json"


def _run_figures(run: Path) -> dict[str, Any]:
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in records if "loss" in r and "event" not in r]
    evals = [r for r in records if "val_loss" in r and "event" not in r]
    if not steps:
        raise MQARError(f"{run / 'log.jsonl'} has no training steps")
    start = next((r for r in records if r.get("event") == "start"), {})
    return {
        "steps": steps[-1]["step"],
        "tokens_seen": steps[-1]["tokens_seen"],
        "wall_min": round(steps[-1]["elapsed_s"] / 60, 2),
        "params": start.get("params"),
        "final_train_loss_mean_last_10_logged": round(
            sum(r["loss"] for r in steps[-10:]) / len(steps[-10:]), 4
        ),
        "val_loss": [(r["step"], round(r["val_loss"], 4)) for r in evals],
        "train_config": json.loads((run / "train_config.json").read_text()),
    }


def export_recall(
    run: str | Path,
    out: str | Path,
    spec: MQARSpec,
    commands: Sequence[str],
    dtype: torch.dtype = torch.float32,
    examples: int = 1000,
    seed: int = 12345,
) -> dict[str, Any]:
    """Ship `run`/model to `out` (config.json, model.safetensors, mqar.json) with its recall measured
    on `examples` fresh examples (read in one sequence; clean and with 50% noise); returns mqar.json."""
    from model.checkpoint import from_pretrained, save_pretrained

    run, out = Path(run), Path(out)
    if not (run / "model" / "config.json").is_file():
        raise FileNotFoundError(f"{run / 'model'} has no model yet: the run has not finished")
    model = from_pretrained(run / "model").eval()
    if model.config.vocab_size < spec.vocab_size:
        raise MQARError(f"model vocab {model.config.vocab_size} < MQAR vocab {spec.vocab_size}")
    save_pretrained(model, out, dtype=dtype)
    shipped = from_pretrained(out).eval()
    card = {
        "spec": asdict(spec),
        "commands": list(commands),
        "dtype": str(dtype).removeprefix("torch."),
        "recall": {
            "examples": examples,
            "seed": seed,
            "clean": recall_accuracy(shipped, make_examples(spec, examples, seed)),
            "noise_0.5": recall_accuracy(shipped, make_examples(spec, examples, seed + 1, noise_ratio=0.5)),
        },
        "training": _run_figures(run),
    }
    atomic_write_bytes(out / MQAR_CARD, (json.dumps(card, indent=2) + "\n").encode())
    return card


# ---------------------------------------------------------------------------- command line


def _spec_args(ap: argparse.ArgumentParser) -> None:
    d = MQARSpec()
    ap.add_argument("--num-keys", type=int, default=d.num_keys)
    ap.add_argument("--num-values", type=int, default=d.num_values)
    ap.add_argument("--num-noise", type=int, default=d.num_noise)
    ap.add_argument("--num-pairs", type=int, default=d.num_pairs)
    ap.add_argument("--layout", default=d.layout, choices=["standard", "fused"])


def _spec(a: argparse.Namespace) -> MQARSpec:
    return MQARSpec(a.num_keys, a.num_values, a.num_noise, a.num_pairs, layout=a.layout)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.mqar", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="write MQAR token shards (train.bin, val.bin, tokens.json)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-examples", type=int, default=40_000)
    p.add_argument("--val-examples", type=int, default=1_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-ratios", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--min-pairs", type=int, default=1)
    _spec_args(p)
    p = sub.add_parser("eval", help="recall accuracy of a model directory on fresh examples")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--noise-ratio", type=float, default=0.0)
    _spec_args(p)
    p = sub.add_parser("export", help="ship a finished run with its recall (config, weights, mqar.json)")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--record", action="append", default=[], help="a command that made the run, for the card (repeat)"
    )
    _spec_args(p)
    a = ap.parse_args(argv)
    try:
        if a.command == "data":
            meta = write_token_dir(
                a.out, _spec(a), a.train_examples, a.val_examples, a.seed, a.noise_ratios, a.min_pairs
            )
            print(json.dumps(meta, indent=2))
        elif a.command == "export":
            dt = torch.float32 if a.dtype == "float32" else torch.bfloat16
            card = export_recall(a.run, a.out, _spec(a), a.record, dt)
            print(json.dumps({k: card[k] for k in ("spec", "recall")}, indent=2))
        else:
            from model.checkpoint import from_pretrained

            model = from_pretrained(a.model).eval()
            spec = _spec(a)
            if model.config.vocab_size < spec.vocab_size:
                raise MQARError(f"model vocab {model.config.vocab_size} < MQAR vocab {spec.vocab_size}")
            ex = make_examples(spec, a.examples, a.seed, a.noise_ratio)
            print(json.dumps({"model": str(a.model), "recall": recall_accuracy(model, ex), **asdict(spec)}))
    except (MQARError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
