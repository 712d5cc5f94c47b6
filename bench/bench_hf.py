"""Benchmark (not a test): serving an fla-hub-shaped RetNet of the 1.3B shape on this CPU.

Writes a random-weight checkpoint directory shaped like `fla-hub/retnet-1.3B-100B` (its config.json
keys, bf16 weights sharded over `--shards` safetensors files with an index, the Llama-style test
tokenizer) into a temporary folder, then, in a fresh subprocess, loads it exactly as the server does
(`server.runtime.load_model`: memory-mapped weights kept in bf16, the float32 fingerprint, the state
bounds, tokenizer and chat template) and measures:

- load time (the files were just written, so their pages are in the page cache: a warm-cache load),
- peak resident memory at load (`ru_maxrss`, and `VmHWM` which restarts at exec) minus the resident
  memory before it (Python + torch), against the size of the weight files (goal: at most 1.3x),
- the peak once the engine's decoder (`model.fast.FastDecoder`: the fused matrices, into which the
  model's weights then point) is built, as the server builds it at startup,
- decode ms per step at B=1 and B=8, rows at position 16, bf16 weights, fp32 states: the engine's
  step (`FastDecoder.step`, eager) and the model's own recurrent forward: per batch size the median
  of `--steps` steps (wall and process CPU ms), the best of `--rounds` rounds (the machine is shared),
- state bytes per session (fp32 and bf16 storage) for the 1.3B and 2.7B shapes.

The folder is deleted afterwards. Usage: `.venv/bin/python bench/bench_hf.py [--json out.json]`
(about 2.7 GB of disk in $TMPDIR; a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import RetNetConfig, preset  # noqa: E402
from model.retnet import RetNet  # noqa: E402
from tests.support.hf_model import build_hf_model, fla_config, write_sharded  # noqa: E402

SHAPES = {"1.3B": dict(hidden_size=2048, num_hidden_layers=24, num_heads=8, vocab_size=32000)}


def write_checkpoint(out: Path, shards: int) -> int:
    """The fla-hub-shaped directory with random bf16 weights of the 1.3B shape; returns the weight bytes."""
    build_hf_model(out / "tok")  # the test tokenizer files (vocab 640 <= 32000) and chat template
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        shutil.copy(out / "tok" / name, out / name)
    shutil.rmtree(out / "tok")
    cfg = fla_config(**SHAPES["1.3B"], _name_or_path="bench/retnet-1.3B-random")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in RetNet(RetNetConfig.from_dict(cfg)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight") or "g_norm" in name:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    write_sharded(tensors, out, shards)
    return sum(f.stat().st_size for f in out.glob("model-*.safetensors"))


def _status(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (VmHWM restarts at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _time_steps(
    step: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, steps: int
) -> list[float]:
    """Median wall ms and median CPU ms (all threads of this process) per step, the first dropped: on a
    shared machine the wall time varies with the other jobs; CPU ms / threads is the uncontended wall."""
    wall, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        tokens = step(tokens)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return [round(statistics.median(wall[1:]) * 1000, 1), round(statistics.median(cpu[1:]) * 1000, 1)]


def _decode(model: RetNet, fast: torch.nn.Module, b: int, steps: int) -> tuple[list[float], list[float]]:
    """ms per step for `b` rows at position 16: the engine's fast step, then the model's forward."""
    with torch.inference_mode():
        _, state = model(torch.randint(3, 32000, (b, 16)))
        tokens = torch.randint(3, 32000, (b,))

        def fast_step(t: torch.Tensor) -> torch.Tensor:
            return fast.step(t, state.layers, state.position).argmax(-1)

        def forward_step(t: torch.Tensor) -> torch.Tensor:
            nonlocal state
            logits, state = model(t[:, None], state=state)
            return logits[:, -1].argmax(-1)

        return _time_steps(fast_step, tokens, steps), _time_steps(forward_step, tokens, steps)


def child(model_dir: str, steps: int, rounds: int) -> None:
    """Runs in a fresh process: load as the server does, then time decode steps. Prints JSON."""
    from model.fast import FastDecoder
    from server.runtime import load_model
    from server.settings import Settings

    before = _status("VmRSS")
    t0 = time.perf_counter()
    loaded = load_model(Settings(model_path=Path(model_dir), device="cpu"))
    out: dict = {"load_s": time.perf_counter() - t0, "rss_before": before}
    out |= {"maxrss_load": _maxrss(), "hwm_load": _status("VmHWM")}
    model = loaded.model
    fast = FastDecoder.shared(model)
    out |= {"hwm_engine": _status("VmHWM"), "dtype": str(model.dtype).removeprefix("torch.")}
    out |= {"threads": torch.get_num_threads(), "fast": {}, "forward": {}}
    for _ in range(rounds):  # the best round: the machine is shared, other jobs only ever slow it down
        for b in (1, 8):
            fast_ms, forward_ms = _decode(model, fast, b, steps)
            out["fast"][b] = min(out["fast"].get(b, fast_ms), fast_ms)
            out["forward"][b] = min(out["forward"].get(b, forward_ms), forward_ms)
    print(json.dumps(out))


def run(shards: int, steps: int, rounds: int) -> dict:
    """Write the checkpoint (in one process), load and time it (in another), delete it; the figures."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_hf_"))
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write", str(tmp), "--shards", str(shards)], check=True)
        weight_bytes = sum(f.stat().st_size for f in tmp.glob("model-*.safetensors"))
        print(f"wrote {weight_bytes / 1e9:.2f} GB in {shards} shards in {time.perf_counter() - t0:.0f} s")
        cmd = [sys.executable, __file__, "--child", str(tmp), "--steps", str(steps), "--rounds", str(rounds)]
        res = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    growth = max(res["maxrss_load"], res["hwm_load"]) - res["rss_before"]
    engine_growth = res["hwm_engine"] - res["rss_before"]
    states = {
        n: {"fp32": preset(n).state_nbytes(4), "bf16": preset(n).state_nbytes(2)} for n in ("1.3B", "2.7B")
    }
    return {
        "machine": f"{platform.machine()}, {res['threads']} threads, torch {torch.__version__}",
        "weight_file_bytes": weight_bytes,
        "load_s": round(res["load_s"], 2),
        "rss_before_load_bytes": res["rss_before"],
        "peak_rss_at_load_bytes": {"ru_maxrss": res["maxrss_load"], "VmHWM": res["hwm_load"]},
        "peak_growth_at_load_over_file_size": round(growth / weight_bytes, 3),
        "peak_growth_with_engine_decoder_over_file_size": round(engine_growth / weight_bytes, 3),
        "serving_dtype": res["dtype"],
        "decode_per_step_engine_fast_step_[wall_ms,cpu_ms]": {f"B={b}": v for b, v in res["fast"].items()},
        "decode_per_step_model_forward_[wall_ms,cpu_ms]": {f"B={b}": v for b, v in res["forward"].items()},
        "state_bytes_per_session": states,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--steps", type=int, default=9, help="decode steps timed per batch size (first dropped)")
    ap.add_argument("--rounds", type=int, default=3, help="decode timings repeated; the best is kept")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        write_checkpoint(args.write, args.shards)
        return
    if args.child:
        child(args.child, args.steps, args.rounds)
        return
    report = run(args.shards, args.steps, args.rounds)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
