"""State-store benchmark (not a test): save / load round trips and bytes on the wire.

Prints, for a real `small`-preset state (the model after reading 512 tokens) and for a 100 MB state
(the one-row state shape of the 1.3B preset, 24 x 8 x 256 x 512 fp32, filled by tiling the real small
state's values so that its bytes compress like a real state's):
  - encoded bytes for fp32 / fp32+zlib / bf16 / bf16+zlib (= bytes on the wire to Redis)
  - median encode, put, get, decode and total round-trip ms against Redis (and the memory store)
  - the lossy options' error on the real small state (state values and next-token logits)
  - whether zlib pays: the link bandwidth below which its saved bytes outweigh its CPU time

Usage: python bench/bench_state_store.py [--redis-url redis://127.0.0.1:6379] [--repeats 9] [--json out.json]
Uses a unique key prefix on that Redis and deletes its keys at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis as redis_sync
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import RetNetConfig, preset
from model.retnet import RetNet
from model.state import RetentionState
from state_store import (
    MemoryStateStore,
    RedisStateStore,
    StateCodec,
    StateStore,
    config_fingerprint,
    max_abs_error,
    max_rel_error,
    model_fingerprint,
)

VARIANTS = [("fp32", None, "none"), ("fp32+zlib", None, "zlib"), ("bf16", "bfloat16", "none"),
            ("bf16+zlib", "bfloat16", "zlib")]  # fmt: skip


def real_small_state() -> tuple[RetNet, RetentionState]:
    torch.manual_seed(0)
    m = RetNet(preset("small")).eval()
    with torch.inference_mode():
        _, s = m(torch.randint(0, 8192, (1, 512)))
    return m, s.clone()


def tiled_state(config: RetNetConfig, source: RetentionState) -> RetentionState:
    """A one-row state of `config`'s shape whose values repeat those of a real state."""
    flat = torch.cat([t.reshape(-1) for t in source.layers])
    shape = config.state_shape(1)
    n = int(torch.tensor(shape).prod())
    layers = []
    for i in range(config.num_hidden_layers):
        idx = (torch.arange(n) + i * 7919) % flat.numel()
        layers.append(flat[idx].reshape(shape).clone())
    return RetentionState(layers, source.position.clone(), config)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


async def round_trips(
    store: StateStore, codec: StateCodec, state: RetentionState, repeats: int
) -> list[dict]:
    rows = []
    for name, sdt, comp in VARIANTS:
        runs: dict[str, list[float]] = {"encode": [], "put": [], "get": [], "decode": [], "total": []}
        size = 0
        for r in range(repeats + 1):  # the first run warms up
            t0 = time.perf_counter()
            data = codec.encode(state, storage_dtype=sdt, compression=comp)
            t_enc = _ms(t0)
            t1 = time.perf_counter()
            await store.put("bench", f"{name}-{r}", data)
            t_put = _ms(t1)
            t2 = time.perf_counter()
            got = await store.get("bench", f"{name}-{r}")
            t_get = _ms(t2)
            assert got is not None
            t3 = time.perf_counter()
            out = codec.decode(got.data)
            t_dec = _ms(t3)
            await store.delete("bench", f"{name}-{r}")
            if sdt is None:
                assert out.state.equal(state)
            size = len(data)
            if r:
                for k, v in zip(
                    runs, (t_enc, t_put, t_get, t_dec, t_enc + t_put + t_get + t_dec), strict=True
                ):
                    runs[k].append(v)
        rows.append({"variant": name, "bytes": size, **{k: statistics.median(v) for k, v in runs.items()}})
    return rows


def print_table(title: str, raw_bytes: int, rows: list[dict]) -> None:
    print(f"\n{title} (layers {raw_bytes:,} bytes)")
    heads = ("encode", "put", "get", "decode")
    print(
        f"{'variant':<10} {'bytes':>12} {'ratio':>6} "
        + " ".join(f"{h:>8}" for h in heads)
        + f" {'total ms':>9}"
    )
    for r in rows:
        print(
            f"{r['variant']:<10} {r['bytes']:>12,} {r['bytes'] / rows[0]['bytes']:>6.3f} {r['encode']:>8.2f}"
            f" {r['put']:>8.2f} {r['get']:>8.2f} {r['decode']:>8.2f} {r['total']:>9.2f}"
        )
    by = {r["variant"]: r for r in rows}
    for base, packed in (("fp32", "fp32+zlib"), ("bf16", "bf16+zlib")):
        saved = by[base]["bytes"] - by[packed]["bytes"]
        cpu_s = (by[packed]["encode"] + by[packed]["decode"] - by[base]["encode"] - by[base]["decode"]) / 1000
        if cpu_s > 0:
            print(f"  zlib on {base}: saves {saved:,} bytes for {cpu_s * 1000:.1f} ms of CPU ->"
                  f" pays only on links slower than {saved / cpu_s / 1e6:.0f} MB/s")  # fmt: skip


def lossy_errors(model: RetNet, state: RetentionState, codec: StateCodec) -> list[dict]:
    out = []
    nxt = torch.tensor([[17]])
    with torch.inference_mode():
        want, _ = model(nxt, state=state)
    for sdt in ("bfloat16", "float16"):
        back = codec.decode(codec.encode(state, storage_dtype=sdt)).state
        with torch.inference_mode():
            got, _ = model(nxt, state=back)
        out.append({
            "dtype": sdt,
            "max_abs": max_abs_error(state, back),
            "max_rel": max_rel_error(state, back),
            "logits_max_abs": (want - got).abs().max().item(),
            "logits_range": want.abs().max().item(),
        })  # fmt: skip
    print("\nlossy storage on the real small state (relative error: |a - b| / max |a| per layer)")
    for e in out:
        print(
            f"  {e['dtype']:<9} state max abs {e['max_abs']:.3g}, max rel {e['max_rel']:.3g}; next-token"
            f" logits max abs {e['logits_max_abs']:.3g} (max |logit| {e['logits_range']:.3g})"
        )
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    model, small = real_small_state()
    codec_small = StateCodec(model.config, model_fingerprint(model))
    big_cfg = preset("1.3B")
    big = tiled_state(big_cfg, small)
    codec_big = StateCodec(big_cfg, config_fingerprint(big_cfg))
    result: dict[str, Any] = {"lossy": lossy_errors(model, small, codec_small)}
    prefix = f"retserve-bench-{uuid.uuid4().hex[:8]}:"
    store = RedisStateStore.from_url(args.redis_url, prefix=prefix)
    try:
        await store.ping()
        result["small_redis"] = await round_trips(store, codec_small, small, args.repeats)
        print_table("small state, Redis", small.nbytes, result["small_redis"])
        result["small_memory"] = await round_trips(MemoryStateStore(), codec_small, small, args.repeats)
        print_table("small state, memory store", small.nbytes, result["small_memory"])
        result["big_redis"] = await round_trips(store, codec_big, big, args.big_repeats)
        print_table("100 MB state (1.3B preset shape), Redis", big.nbytes, result["big_redis"])
    finally:
        await store.close()
        client = redis_sync.Redis.from_url(args.redis_url)
        for key in client.scan_iter(match=prefix + "*"):
            client.unlink(key)
        client.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    ap.add_argument("--repeats", type=int, default=9, help="timed runs per variant, small state (median)")
    ap.add_argument("--big-repeats", type=int, default=3, help="timed runs per variant, 100 MB state")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()
    info = redis_sync.Redis.from_url(args.redis_url).info("server")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads,"
          f" Redis {info.get('redis_version')} at {args.redis_url}")  # fmt: skip
    result = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
