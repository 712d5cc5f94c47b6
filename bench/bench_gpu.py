"""GPU benchmark (not a test): decode and prefill of a random-weight RetNet of the fla-hub 1.3B shape in
bf16 (fp32 states) against the memory-bandwidth roofline.

Prints a table and writes JSON (default runs/bench_gpu.json):
  - decode: one recurrent step for 1, 32, 128 and 256 rows (rows at position 16): ms/step, tokens/s,
    and the roofline: every step reads the weights once (bytes of all parameters but the embedding
    table, of which it reads one row per token) and reads + writes each row's fp32 state, so
    roofline ms = (weight bytes + 2 * state bytes) / bandwidth. B=1 is also shown against the
    weights-only roofline (what a B=1 decode is bound by).
  - prefill: one prompt of 8k and of 32k tokens read chunkwise (logits of the last token only):
    tokens/s and the TFLOP/s of the linear layers (2 * non-embedding parameters * tokens).
Timing: CUDA events after torch.cuda.synchronize on cuda; perf_counter on cpu.

Usage, on a GPU host:   python bench/bench_gpu.py                      (1.3B, bf16, cuda, H200 4,800 GB/s)
                        python bench/bench_gpu.py --bandwidth-gbs 3350 (an H100 SXM)
CPU smoke run (seconds): python bench/bench_gpu.py --device cpu --tiny
Never run on a GPU yet (see docs/gpu.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import PRESETS, preset
from model.retnet import RetNet
from model.state import RetentionState

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
H200_BANDWIDTH_GBS = 4800.0  # HBM3e, NVIDIA's H200 SXM datasheet


class Timer:
    """Milliseconds of a callable: CUDA events on cuda (the GPU's own clock), perf_counter on cpu."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def ms(self, fn: Callable[[], object]) -> float:
        self.sync()
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def weight_bytes_per_step(model: RetNet, rows: int) -> int:
    """Bytes of weights a decode step reads: all parameters but the embedding table, + a row per token."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.model.embeddings.weight
    if model.config.tie_word_embeddings:  # lm_head reads the whole (shared) table anyway
        return total
    return total - emb.numel() * emb.element_size() + rows * emb.shape[1] * emb.element_size()


def linear_params(model: RetNet) -> int:
    """Parameters of the matmuls a token goes through (all 2-D weights but the embedding table)."""
    emb = model.model.embeddings.weight
    n = sum(p.numel() for p in model.parameters() if p.ndim == 2 and p is not emb)
    return n + (emb.numel() if model.config.tie_word_embeddings else 0)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def decode_case(model: RetNet, timer: Timer, rows: int, steps: int, repeats: int, bw_gbs: float) -> dict:
    dev, V = model.device, model.config.vocab_size
    _peak_reset(dev)
    state: RetentionState
    _, state = model(torch.randint(0, V, (rows, 16), device=dev), logits_to_keep=1)  # rows at position 16
    tok = torch.randint(0, V, (rows, 1), device=dev)  # (B, 1)

    def run(n: int) -> None:
        nonlocal state, tok
        for _ in range(n):
            logits, state = model(tok, state=state)  # (B, 1, V), one recurrent step
            tok = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1), stays on the device: no sync

    run(3)  # warm-up (allocator, kernels)
    ms = statistics.median(timer.ms(lambda: run(steps)) / steps for _ in range(repeats))
    w, s = weight_bytes_per_step(model, rows), state.nbytes
    roof_w = w / (bw_gbs * 1e9) * 1e3
    roof = (w + 2 * s) / (bw_gbs * 1e9) * 1e3
    return {
        "rows": rows,
        "ms_per_step": ms,
        "tokens_per_s": rows * 1000 / ms,
        "weight_bytes": w,
        "state_bytes": s,
        "roofline_weights_ms": roof_w,
        "roofline_ms": roof,
        "fraction_of_roofline": roof / ms,
        "peak_gib": _peak_gib(dev),
    }


def prefill_case(model: RetNet, timer: Timer, tokens: int, repeats: int, chunk_size: int) -> dict:
    dev = model.device
    _peak_reset(dev)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=dev)  # (1, T)
    model(ids[:, : min(tokens, 4 * chunk_size)], logits_to_keep=1, chunk_size=chunk_size)  # warm-up
    ms = statistics.median(
        timer.ms(lambda: model(ids, logits_to_keep=1, chunk_size=chunk_size)) for _ in range(repeats)
    )
    return {
        "tokens": tokens,
        "ms": ms,
        "tokens_per_s": tokens * 1000 / ms,
        "linear_tflops": 2 * linear_params(model) * tokens / (ms / 1000) / 1e12,
        "peak_gib": _peak_gib(dev),
    }


def guarded(fn: Callable[[], dict], label: dict) -> dict:
    """Run a case; an out-of-memory is recorded as such (the other cases still run)."""
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {**label, "error": f"out of memory: {str(e).splitlines()[0]}"}


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return vals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="weights (states are fp32)")
    ap.add_argument("--preset", default="1.3B", choices=sorted(PRESETS), help="model shape (default 1.3B)")
    ap.add_argument(
        "--tiny", action="store_true", help="smoke mode: the tiny preset, short prompts, few steps"
    )
    ap.add_argument("--bandwidth-gbs", type=float, default=H200_BANDWIDTH_GBS, help="memory bandwidth, GB/s")
    ap.add_argument("--rows", type=_ints, default=[1, 32, 128, 256], help="decode batch sizes")
    ap.add_argument("--prefill", type=_ints, default=None, help="prompt lengths (default 8192,32768)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case (the median is reported)")
    ap.add_argument("--chunk-size", type=int, default=64, help="the chunkwise prefill's block size")
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "bench_gpu.json", help="JSON output path")
    args = ap.parse_args(argv)
    if not args.bandwidth_gbs > 0:
        ap.error(f"--bandwidth-gbs must be positive, got {args.bandwidth_gbs}")
    for name in ("steps", "repeats", "chunk_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        ap.error(f"--device {args.device!r} is not a device: {e}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here (the CPU smoke run: --device cpu --tiny)")
    if args.tiny:
        args.preset = "tiny"
        args.steps = min(args.steps, 8)
        args.prefill = args.prefill or [512, 2048]
    args.prefill = args.prefill or [8192, 32768]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dev, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    with torch.device(dev):  # built on the device: no 5 GB fp32 copy on the host
        model = RetNet(preset(args.preset)).eval()
    model = model.to(dtype)
    timer = Timer(dev)
    out: dict = {
        "preset": args.preset,
        "params": model.num_parameters(),
        "dtype": args.dtype,
        "state_dtype": "float32",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bandwidth_gbs": args.bandwidth_gbs,
        "timing": "cuda events" if dev.type == "cuda" else "perf_counter",
    }
    print(
        f"{args.preset}: {out['params']:,} params, {args.dtype} weights, fp32 states, "
        f"on {out['device_name']} ({dev}); roofline at {args.bandwidth_gbs:,.0f} GB/s"
    )
    with torch.inference_mode():
        out["decode"] = [
            guarded(
                lambda b=b: decode_case(model, timer, b, args.steps, args.repeats, args.bandwidth_gbs),
                {"rows": b},
            )
            for b in args.rows
        ]
        out["prefill"] = [
            guarded(lambda t=t: prefill_case(model, timer, t, args.repeats, args.chunk_size), {"tokens": t})
            for t in args.prefill
        ]
    print_tables(out)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return out


def print_tables(out: dict) -> None:
    print("\ndecode (one recurrent step)")
    print(
        f"{'rows':>5} {'ms/step':>9} {'tok/s':>10} {'state MiB':>10} "
        f"{'roof(w) ms':>10} {'roof ms':>9} {'% roof':>7}"
    )
    for d in out["decode"]:
        if "error" in d:
            print(f"{d['rows']:>5} {d['error']}")
            continue
        print(
            f"{d['rows']:>5} {d['ms_per_step']:>9.3f} {d['tokens_per_s']:>10,.0f} "
            f"{d['state_bytes'] / 2**20:>10.1f} {d['roofline_weights_ms']:>10.3f} {d['roofline_ms']:>9.3f} "
            f"{100 * d['fraction_of_roofline']:>6.1f}%"
        )
    print("  roof(w): weights only; roof: weights + each row's fp32 state read and written\n")
    print("prefill (one prompt, chunkwise, last-token logits)")
    print(f"{'tokens':>7} {'ms':>10} {'tok/s':>10} {'linear TFLOP/s':>15}")
    for p in out["prefill"]:
        if "error" in p:
            print(f"{p['tokens']:>7} {p['error']}")
            continue
        print(f"{p['tokens']:>7} {p['ms']:>10.1f} {p['tokens_per_s']:>10,.0f} {p['linear_tflops']:>15.2f}")


if __name__ == "__main__":
    main()
