"""Decode-step micro-benchmark (not a test): the threading and compilation facts the engine relies on.

Prints, for the shipped model on this machine, ms per batched recurrent step at B = 1, 8, 32:
  1. on the main thread with --threads torch threads;
  2. on a second thread (like the engine's) with --threads, after the main thread ran a
     multi-threaded op: the "second OpenMP team" slowdown;
  3. the same, in a fresh process whose main thread stayed at 1 thread (what the server does);
  4. the reference forward (`RetNet.forward`, mode "recurrent") vs the engine's DecodeStep (the fast
     path of model/fast.py) eager vs `torch.compile`d on such a thread (the compiled DecodeStep
     selects, per bucket, compiled or eager by timing at warm-up: its choice is printed; the
     "compiled" line forces compilation);
and the time to first token of a 3-token prompt on an idle engine.

Usage: python bench/bench_decode.py [--threads 2] [--skip-compile]
(parts 2 and 3 need separate processes: the script re-runs itself with --part.)
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.checkpoint import from_pretrained, load_tokenizer  # noqa: E402
from server.engine import Engine, EngineConfig, EngineRequest, EngineSamplingParams  # noqa: E402
from server.engine.decode import DecodeStep  # noqa: E402

CKPT = ROOT / "checkpoints/retserve-small"
BATCHES = (1, 8, 32)


def step_ms(step, model, batch: int, n: int = 200) -> float:
    with torch.no_grad():
        state, ids = model.empty_state(batch), torch.randint(0, 8000, (batch, 1))
        for _ in range(10):
            step(ids, state)
        t0 = time.perf_counter()
        for _ in range(n):
            _, state = step(ids, state)
        return (time.perf_counter() - t0) / n * 1e3


def reference(model):
    """The landed decode step: the model's own forward, one token, recurrent mode."""
    return lambda ids, state: model(ids, state, mode="recurrent")


def in_thread(fn):
    out = []
    th = threading.Thread(target=lambda: out.append(fn()))
    th.start()
    th.join()
    return out[0]


def part(name: str, threads: int, compile: bool) -> None:
    """One measurement in this process (each part needs a process of its own)."""
    main_threads = threads if name in ("main", "second-team") else 1
    torch.set_num_threads(main_threads)
    model = from_pretrained(CKPT).float().eval()
    eager = DecodeStep(model)
    if name == "second-team":  # the main thread has run multi-threaded ops (model load + a forward)
        with torch.no_grad():
            model(torch.randint(0, 8000, (8, 64)))
    if name == "main":
        res = {b: step_ms(eager, model, b) for b in BATCHES}
        print(f"  main thread, {threads} threads:{_fmt(res)}")
        return

    def run() -> dict[str, dict[int, float]]:
        torch.set_num_threads(threads)
        r = {"eager": {b: step_ms(eager, model, b) for b in BATCHES}}
        if name == "own-team":
            r["reference"] = {b: step_ms(reference(model), model, b) for b in BATCHES}
        if name == "own-team" and compile:
            compiled = DecodeStep(model, True, BATCHES, select_by_timing=False)
            compiled.warmup()
            r["compiled"] = {b: step_ms(compiled, model, b) for b in BATCHES}
            selected = DecodeStep(model, True, BATCHES)
            selected.warmup()
            print(f"  per-bucket choice at warm-up: {selected.choice}")
            r["selected"] = {b: step_ms(selected, model, b) for b in BATCHES}
        return r

    res = in_thread(run)
    label = {
        "second-team": f"second thread, {threads} threads, main thread ran {threads}-thread ops",
        "own-team": f"second thread, {threads} threads, main thread kept at 1",
    }[name]
    for kind, r in res.items():
        print(f"  {label}, {kind}:{_fmt(r)}")
    if name == "own-team":
        print(f"  idle engine, 3-token prompt, time to first token: {idle_ttft(model, threads):.2f} ms")


def idle_ttft(model, threads: int) -> float:
    tok = load_tokenizer(CKPT)

    async def go() -> float:
        eng = Engine(model, tok, EngineConfig(num_threads=threads))
        try:
            ids = tok.encode(" And then")
            p = EngineSamplingParams(temperature=0, max_tokens=1)
            times = []
            for _ in range(12):
                t0 = time.perf_counter()
                async for out in eng.submit(EngineRequest(ids, p)):
                    if out.token_ids:
                        times.append(time.perf_counter() - t0)
            return sorted(times[2:])[len(times[2:]) // 2] * 1e3
        finally:
            eng.shutdown()

    return asyncio.run(go())


def _fmt(r: dict[int, float]) -> str:
    return "".join(f"  B={b} {ms:5.2f} ms" for b, ms in r.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--part", choices=["main", "second-team", "own-team"])
    args = ap.parse_args()
    if args.part:
        part(args.part, args.threads, not args.skip_compile)
        return
    print(f"retserve-small decode step, torch {torch.__version__}, {args.threads} threads, ms per step")
    for name in ("main", "second-team", "own-team"):
        cmd = [sys.executable, __file__, "--part", name, "--threads", str(args.threads)]
        subprocess.run(cmd + (["--skip-compile"] if args.skip_compile else []), check=True)


if __name__ == "__main__":
    main()
