"""Model-core benchmark (not a test): decode and prefill speed of a preset on this machine.

Prints, for the preset (default `small`, random weights: speed does not depend on their values):
  - recurrent decode ms/token at B=1 and aggregate tokens/s at B=1, 8, 32
  - decode ms/token at position 128 and at position 16k (a real 16k-token chunkwise prefill first)
  - chunkwise prefill of 4096 tokens vs the same tokens fed one at a time

Decode runs through `--path fast` (default: the engine's DecodeStep, model/fast.py, eager) or
`--path reference` (RetNet.forward in recurrent mode, the landed step before the fast path).

Usage: python bench/bench_model.py [--preset small] [--threads N] [--path fast|reference]
       [--chunk-sizes 32,64,128,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import preset
from model.retnet import RetNet
from model.state import RetentionState
from server.engine.decode import DecodeStep

Step = Callable[[torch.Tensor, RetentionState], tuple[torch.Tensor, RetentionState]]


def reference_step(model: RetNet) -> Step:
    def step(tok: torch.Tensor, state: RetentionState) -> tuple[torch.Tensor, RetentionState]:
        logits, state = model(tok, state=state)
        return logits[:, -1], state

    return step


def _decode_run_ms(step: Step, state: RetentionState, steps: int, vocab: int) -> float:
    """Mean wall time of one batched recurrent step over `steps` greedy steps, in ms."""
    tok = torch.randint(0, vocab, (state.batch_size, 1))
    state = state.clone()  # the fast step advances its state in place
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, state = step(tok, state)
        tok = logits.argmax(-1, keepdim=True)
    return (time.perf_counter() - t0) * 1000 / steps


def _decode_ms(step: Step, states: list[RetentionState], steps: int, repeats: int, vocab: int) -> list[float]:
    """Median ms/step for each state; runs are interleaved so that machine noise hits all alike."""
    for s in states:  # warm-up
        _decode_run_ms(step, s, 5, vocab)
    runs: list[list[float]] = [[] for _ in states]
    for _ in range(repeats):
        for i, s in enumerate(states):
            runs[i].append(_decode_run_ms(step, s, steps, vocab))
    return [statistics.median(r) for r in runs]


def _chunk_sweep(model: RetNet, ids: torch.Tensor, sizes: list[int], rounds: int = 3) -> dict[int, float]:
    """Chunkwise prefill seconds per chunk size (interleaved rounds, median): how the default 64 was
    chosen (RetNet.forward's chunk_size and EngineConfig.chunk_size)."""
    runs: dict[int, list[float]] = {cs: [] for cs in sizes}
    for _ in range(rounds):
        for cs in sizes:
            t0 = time.perf_counter()
            model(ids, mode="chunk", chunk_size=cs, logits_to_keep=1)
            runs[cs].append(time.perf_counter() - t0)
    res = {cs: round(statistics.median(r), 3) for cs, r in runs.items()}
    print(
        "prefill", ids.shape[1], "tokens by chunk size (s):", "  ".join(f"{c}: {t}" for c, t in res.items())
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per timing run")
    ap.add_argument("--long", type=int, default=16384, help="the long position for the position test")
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    ap.add_argument("--path", choices=["fast", "reference"], default="fast", help="the decode step")
    ap.add_argument(
        "--chunk-sizes",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[],
        help="also time the chunkwise prefill at these chunk sizes, e.g. 32,64,128,256",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = RetNet(preset(args.preset)).eval()
    V = model.config.vocab_size
    step = DecodeStep(model) if args.path == "fast" else reference_step(model)
    out: dict[str, object] = {
        "preset": args.preset,
        "path": args.path,
        "params": model.num_parameters(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    print(
        f"preset={args.preset} params={out['params']:,} torch={torch.__version__} threads={out['threads']}"
        f" decode path={args.path}"
    )

    with torch.inference_mode():
        # 1. decode throughput by batch size (rows at position 128)
        tps = {}
        for B in (1, 8, 32):
            _, st = model(torch.randint(0, V, (B, 128)))
            (ms,) = _decode_ms(step, [st], args.steps, 5, V)
            tps[B] = B * 1000 / ms
            out[f"decode_ms_per_step_B{B}"] = round(ms, 3)
            out[f"decode_tokens_per_s_B{B}"] = round(tps[B], 1)
            print(f"decode B={B:>2}: {ms:7.3f} ms/step  {tps[B]:9.1f} tokens/s")
        out["decode_ms_per_token_B1"] = out["decode_ms_per_step_B1"]
        out["speedup_B32_over_B1"] = round(tps[32] / tps[1], 2)
        print(f"aggregate tokens/s B=32 / B=1: {tps[32] / tps[1]:.2f}x (goal >= 8x)")

        # 2. decode cost vs position: 128 vs 16k (both prefilled for real)
        _, short = model(torch.randint(0, V, (1, 128)))
        t0 = time.perf_counter()
        _, long = model(torch.randint(0, V, (1, args.long)), logits_to_keep=1)
        long_prefill_s = time.perf_counter() - t0
        assert int(long.position[0]) == args.long
        ms_short, ms_long = _decode_ms(step, [short, long], args.steps, 15, V)
        out["decode_ms_at_pos_128"] = round(ms_short, 3)
        out[f"decode_ms_at_pos_{args.long}"] = round(ms_long, 3)
        out["pos_long_over_short"] = round(ms_long / ms_short, 3)
        print(
            f"decode at position 128: {ms_short:.3f} ms/token; at {args.long}: {ms_long:.3f} ms/token "
            f"({(ms_long / ms_short - 1) * 100:+.1f}%, goal within 5%); "
            f"{args.long}-token prefill {long_prefill_s:.2f}s"
        )

        # 3. chunkwise prefill vs token by token
        ids = torch.randint(0, V, (1, args.prefill))
        model(ids[:, :256], logits_to_keep=1)  # warm-up
        chunk_runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            _, s_chunk = model(ids, mode="chunk", logits_to_keep=1)
            chunk_runs.append(time.perf_counter() - t0)
        chunk_s = min(chunk_runs)
        t0 = time.perf_counter()
        s = model.empty_state(1)
        for t in range(args.prefill):
            _, s = model(ids[:, t : t + 1], state=s)
        step_s = time.perf_counter() - t0
        err = max((a - b).abs().max().item() for a, b in zip(s.layers, s_chunk.layers, strict=True))
        out["prefill_tokens"] = args.prefill
        out["prefill_chunk_s"] = round(chunk_s, 3)
        out["prefill_token_by_token_s"] = round(step_s, 3)
        out["prefill_speedup"] = round(step_s / chunk_s, 1)
        out["prefill_chunk_tokens_per_s"] = round(args.prefill / chunk_s, 1)
        print(
            f"prefill {args.prefill} tokens: chunkwise {chunk_s:.3f}s ({args.prefill / chunk_s:,.0f} tok/s), "
            f"token by token {step_s:.3f}s -> {step_s / chunk_s:.1f}x (goal >= 10x); "
            f"max state difference {err:.2e}"
        )
        if args.chunk_sizes:
            out["prefill_s_by_chunk_size"] = _chunk_sweep(model, ids, args.chunk_sizes)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
