"""`python -m training <command>`: prepare, train-tokenizer, tokenize, train, eval, export, compare.

Every path given on the command line (or taken from a default, or from a training config) is made
absolute here, once, against the working directory the command was started in; nothing after this
boundary depends on the process's working directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from training.config import absolute_path

# Relative to the working directory; argparse passes string defaults through `type` (absolute_path).
DEFAULT_CACHE = "data/cache"
DEFAULT_CORPUS = "data/builtin"
DEFAULT_TOKENIZER = "data/tokenizer"


def absolute_pattern(pattern: str) -> str:
    """A file glob made absolute against the working directory (``**`` and ``*`` are kept)."""
    return os.fspath(absolute_path(pattern))


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_prepare(a: argparse.Namespace) -> None:
    from training import data

    if a.source == "builtin":
        manifest = data.prepare_builtin(a.cache_dir, a.out, val_fraction=a.val_fraction, force=a.force)
    elif a.source == "files":
        if not a.pattern:
            raise SystemExit("prepare files needs --pattern 'path/**/*.txt'")
        manifest = data.prepare_files(a.pattern, a.out, val_fraction=a.val_fraction)
    else:
        if not a.pattern:
            raise SystemExit("prepare fineweb needs --pattern 'path/to/fineweb/**/*.parquet'")
        manifest = data.prepare_fineweb(a.pattern, a.out, val_fraction=a.val_fraction, max_docs=a.max_docs)
    _print({k: v for k, v in manifest.items() if k in ("splits", "outputs", "sources")})


def cmd_train_tokenizer(a: argparse.Namespace) -> None:
    from training.tokenizer_train import train_tokenizer_from_corpus

    _print(train_tokenizer_from_corpus(a.corpus, a.out, vocab_size=a.vocab_size, max_chars=a.max_chars))


def cmd_tokenize(a: argparse.Namespace) -> None:
    from model.tokenizer import Tokenizer
    from training.data import tokenize_corpus

    _print(tokenize_corpus(a.corpus, Tokenizer.from_dir(a.tokenizer), a.out or a.corpus / "tokens"))


def cmd_train(a: argparse.Namespace) -> None:
    from training.config import TrainConfig, config_path, parse_overrides
    from training.train import train

    cfg = TrainConfig.from_yaml(config_path(a.config), parse_overrides(a.set)).resolved()
    last = train(cfg, resume=a.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        _print({k: v for k, v in last.items() if k != "sample"})


def cmd_eval(a: argparse.Namespace) -> None:
    import torch

    from model.checkpoint import from_pretrained, load_baseline
    from training.data import load_tokens
    from training.evaluate import eval_loss

    cfg = json.loads((a.model / "config.json").read_text())
    model = load_baseline(a.model) if cfg.get("model_type") == "gpt-baseline" else from_pretrained(a.model)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = eval_loss(model, load_tokens(a.data, a.split), a.seq_len, a.batch_size, a.max_batches)
    _print({"model": str(a.model), "split": a.split, **res})


def cmd_export(a: argparse.Namespace) -> None:
    from training.export import export_run

    _print(export_run(a.run, a.out, dtype=a.dtype, command=a.command, eval_batches=a.eval_batches))


def cmd_compare(a: argparse.Namespace) -> None:
    from training.compare import run_comparison
    from training.config import config_path

    _print(run_comparison(config_path(a.config), a.out_dir, a.docs, steps=a.steps, contexts=a.contexts))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="assemble a text corpus (train.jsonl, val.jsonl, manifest.json)")
    p.add_argument("source", choices=["builtin", "files", "fineweb"])
    p.add_argument("--out", type=absolute_path, default=DEFAULT_CORPUS)
    p.add_argument("--cache-dir", type=absolute_path, default=DEFAULT_CACHE)
    p.add_argument("--pattern", type=absolute_pattern, help="glob of input files (files, fineweb)")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--force", action="store_true", help="download again")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE and write it in tiktoken format")
    p.add_argument("--corpus", type=absolute_path, default=DEFAULT_CORPUS)
    p.add_argument("--out", type=absolute_path, default=DEFAULT_TOKENIZER)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-chars", type=int, default=None)
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("tokenize", help="tokenize a prepared corpus into uint16 memmap shards")
    p.add_argument("--corpus", type=absolute_path, default=DEFAULT_CORPUS)
    p.add_argument("--tokenizer", type=absolute_path, default=DEFAULT_TOKENIZER)
    p.add_argument("--out", type=absolute_path, default=None, help="default: <corpus>/tokens")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("train", help="train a model (torchrun for several processes)")
    p.add_argument("--config", default="small", help="a YAML file or a shipped config name")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config values")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation loss of a model directory")
    p.add_argument("--model", type=absolute_path, required=True)
    p.add_argument("--data", type=absolute_path, default=f"{DEFAULT_CORPUS}/tokens")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="ship a finished run: half-precision weights, tokenizer, model card")
    p.add_argument("--run", type=absolute_path, default="runs/small")
    p.add_argument("--out", type=absolute_path, default="checkpoints/retserve-small")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--command", default=None, help="the training command to record in the model card")
    p.add_argument(
        "--eval-batches",
        type=int,
        default=None,
        help="validation batches to measure (default: the whole split)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="RetNet vs Transformer baseline: loss curves and decode cost")
    p.add_argument("--config", default="compare")
    p.add_argument("--out-dir", type=absolute_path, default="runs/compare")
    p.add_argument("--docs", type=absolute_path, default="docs")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--contexts", type=int, nargs="*", default=[128, 512, 2048, 8192])
    p.set_defaults(func=cmd_compare)

    a = ap.parse_args(argv)
    try:
        a.func(a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
