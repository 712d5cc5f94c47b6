"""Engine benchmark (not a test): continuous-batching throughput and latency under a long admission.

Prints, for the shipped `checkpoints/retserve-small` on this CPU:
  - aggregate completion tokens/s with 1, 8, 32, 64 concurrent greedy requests
  - inter-token latency p50/p99 of 8 running streams, without and while an 8k-token prompt is read

Usage: python bench/bench_engine.py [--tokens 32] [--budget 128] [--long 8192] [--threads N]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints/retserve-small"))
    ap.add_argument("--tokens", type=int, default=32, help="completion tokens per request")
    ap.add_argument("--budget", type=int, default=128, help="prefill tokens per iteration (and chunk)")
    ap.add_argument("--long", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--concurrency", default="1,8,32,64")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = from_pretrained(args.checkpoint).float().eval()
    tok = load_tokenizer(args.checkpoint)
    cfg = EngineConfig(max_running=64, prefill_chunk=args.budget, prefill_budget=args.budget)
    print(f"retserve-small engine benchmark, torch {torch.__version__}, threads {torch.get_num_threads()}")
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


if __name__ == "__main__":
    main()
