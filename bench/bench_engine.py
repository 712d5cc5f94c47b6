"""Engine benchmark (not a test): continuous-batching throughput and latency under a long admission.

Prints, for the shipped `checkpoints/retserve-small` on this CPU:
  - aggregate completion tokens/s with 1, 8, 32, 64 concurrent greedy requests
  - inter-token latency p50/p99 of 8 running streams, without and while an 8k-token prompt is read

Usage: python bench/bench_engine.py [--tokens 32] [--budget 64] [--idle-budget 1024] [--long 8192]
                                   [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.checkpoint import from_pretrained, load_tokenizer  # noqa: E402
from server.engine import Engine, EngineConfig, EngineRequest, EngineSamplingParams  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog and"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def throughput(model, tok, cfg: EngineConfig, n: int, tokens: int) -> float:
    eng = Engine(model, tok, cfg)
    try:
        ids = tok.encode(PROMPT)
        p = EngineSamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        await eng.submit(EngineRequest(ids, p)).collect()  # warm-up
        t0 = time.perf_counter()
        res = await asyncio.gather(*(eng.submit(EngineRequest(ids, p)).collect() for _ in range(n)))
        dt = time.perf_counter() - t0
        return sum(len(r[0]) for r in res) / dt
    finally:
        eng.shutdown()


async def latency(model, tok, cfg: EngineConfig, long_len: int | None, streams: int = 8, window: float = 2.0):
    """Client-side gaps between deltas of running streams, over a window (or the long admission)."""
    eng = Engine(model, tok, cfg)
    gaps: list[float] = []
    measuring = False

    async def stream(req):
        last = None
        async for out in eng.submit(req):
            now = time.perf_counter()
            if measuring and last is not None and out.token_ids:
                gaps.append(now - last)
            last = now
            if out.finished:
                return

    try:
        ids = tok.encode(PROMPT)
        p = EngineSamplingParams(temperature=0, max_tokens=1_000_000, ignore_eos=True)
        reqs = [EngineRequest(ids, p) for _ in range(streams)]
        tasks = [asyncio.create_task(stream(r)) for r in reqs]
        await asyncio.sleep(0.5)  # streams running
        measuring = True
        t0 = time.perf_counter()
        if long_len:
            long_ids = (tok.encode(PROMPT + " ") * (long_len // 8 + 1))[:long_len]
            await eng.submit(
                EngineRequest(long_ids, EngineSamplingParams(temperature=0, max_tokens=1))
            ).collect()
        else:
            await asyncio.sleep(window)
        dt = time.perf_counter() - t0
        measuring = False
        for r in reqs:
            eng.abort(r.request_id)
        await asyncio.gather(*tasks)
        return pct(gaps, 0.5) * 1e3, pct(gaps, 0.99) * 1e3, dt, len(gaps)
    finally:
        eng.shutdown()


async def long_alone(model, tok, cfg: EngineConfig, long_len: int) -> float:
    """Seconds to the first token of a long prompt with nothing else running (the idle budget)."""
    eng = Engine(model, tok, cfg)
    try:
        long_ids = (tok.encode(PROMPT + " ") * (long_len // 8 + 1))[:long_len]
        p = EngineSamplingParams(temperature=0, max_tokens=1)
        await eng.submit(EngineRequest(long_ids[:256], p)).collect()  # warm-up
        t0 = time.perf_counter()
        await eng.submit(EngineRequest(long_ids, p)).collect()
        return time.perf_counter() - t0
    finally:
        eng.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints/retserve-small"))
    ap.add_argument("--tokens", type=int, default=32, help="completion tokens per request")
    ap.add_argument("--budget", type=int, default=None, help="prefill tokens per iteration, rows decoding")
    ap.add_argument("--idle-budget", type=int, default=None, help="prefill tokens per iteration, no rows")
    ap.add_argument("--long", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="engine intra-op threads")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (buckets)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the event loop's thread; the engine thread gets --threads
    model = from_pretrained(args.checkpoint).float().eval()
    tok = load_tokenizer(args.checkpoint)
    cfg = EngineConfig(max_running=64, num_threads=args.threads, compile=args.compile)
    if args.budget:
        cfg.prefill_budget_decoding = args.budget
    if args.idle_budget:
        cfg.prefill_budget = args.idle_budget
    print(
        f"retserve-small engine benchmark, torch {torch.__version__}, engine threads {args.threads},"
        f" prefill chunk {cfg.prefill_chunk}, budget {cfg.prefill_budget} idle /"
        f" {cfg.prefill_budget_decoding} decoding, compile {cfg.compile}"
    )
    base = None
    for n in [int(x) for x in args.concurrency.split(",")]:
        tps = asyncio.run(throughput(model, tok, cfg, n, args.tokens))
        base = base or tps
        print(f"  {n:3d} concurrent: {tps:8.1f} tokens/s  ({tps / base:.1f}x of 1)")
    p50, p99, dt, n = asyncio.run(latency(model, tok, cfg, None))
    print(f"  ITL 8 streams, no admission:      p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  ({n} gaps, {dt:.1f}s)")
    q50, q99, dt, n = asyncio.run(latency(model, tok, cfg, args.long))
    print(
        f"  ITL 8 streams, {args.long}-token admission: p50 {q50:6.1f} ms  p99 {q99:6.1f} ms"
        f"  ({n} gaps, prompt read in {dt:.1f}s; p99 ratio {q99 / p99:.1f}x)"
    )
    alone = asyncio.run(long_alone(model, tok, cfg, args.long))
    print(f"  {args.long}-token prompt alone: first token after {alone:.2f}s")


if __name__ == "__main__":
    main()
