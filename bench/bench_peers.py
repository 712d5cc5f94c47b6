"""retserve against its peers, in one process, interleaved, medians (issue 14's table).

Peers (optional, `make bench-peers` installs them: bench/peers/install.sh):
  - torchscale 0.3.0 `RetNetDecoder` (Microsoft's official RetNet), recurrent decode;
  - Hugging Face transformers' GPT-2 with its KV cache (sdpa attention), decode at a context and prefill.
Each comparison builds retserve's RetNet with the peer's shape (printed with both parameter counts),
random weights, float32, and times, round after round in turn (interleaved, so a busy neighbour slows
both alike), the peer and retserve's paths:
  - `reference`: `RetNet.forward` (mode "recurrent" for a step, chunkwise for a prompt);
  - `fast`: model.fast.FastDecoder's step, eager (what the engine runs without compilation);
  - `compiled`: the engine's DecodeStep with compilation on (per bucket, compiled or eager, whichever
    its start-up measurement chose), unless --no-compile.
Decode figures are ms per step of B rows (one token each); prefill figures are seconds for a prompt
(logits of the last token only, the state / KV cache returned). ratio = peer / retserve (> 1: faster).

Usage: python bench/bench_peers.py [--threads 2] [--rounds 7] [--quick] [--no-compile] [--json out.json]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import RetNetConfig  # noqa: E402
from model.fast import FastDecoder  # noqa: E402
from model.retnet import RetNet  # noqa: E402
from server.engine.decode import DecodeStep  # noqa: E402

Fn = Callable[[], object]


def interleaved(fns: dict[str, Fn], rounds: int, per_round: int) -> dict[str, float]:
    """Median over rounds of the mean ms per call; the functions take turns within each round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[name].append((time.perf_counter() - t0) / per_round * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def retserve_paths(model: RetNet, batch: int, state, compile: bool) -> dict[str, Fn]:
    """reference / fast / compiled decode steps of `batch` rows from `state` (a copy each)."""
    tok = torch.randint(0, model.config.vocab_size, (batch,))
    ref_state = state.clone()
    fast_state = state.clone()
    dec = FastDecoder.shared(model)
    fns: dict[str, Fn] = {
        "reference": lambda: model(tok[:, None], ref_state, mode="recurrent"),
        "fast": lambda: dec.step(tok, fast_state.layers, fast_state.position),
    }
    if compile:
        step = DecodeStep(model, True, (batch,))
        step.warmup()
        comp_state = state.clone()
        fns["compiled"] = lambda: step(tok[:, None], comp_state)
    return fns


def non_embedding(module: torch.nn.Module, skip: tuple[str, ...]) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not any(s in n for s in skip))


# ---- torchscale ------------------------------------------------------------------------------------
def torchscale_rows(args: argparse.Namespace) -> list[dict]:
    stubs = str(ROOT / "bench/peers/stubs")
    try:
        import timm  # noqa: F401
    except ImportError:
        sys.path.insert(0, stubs)  # torchscale imports timm's drop_path (unused here): bench/peers/stubs
    from torchscale.architecture.config import RetNetConfig as TSConfig
    from torchscale.architecture.retnet import RetNetDecoder

    d, layers, heads, vocab = 256, 6, 4, 32000
    ts_args = TSConfig(
        decoder_embed_dim=d,
        decoder_value_embed_dim=2 * d,
        decoder_retention_heads=heads,
        decoder_ffn_embed_dim=2 * d,
        decoder_layers=layers,
        vocab_size=vocab,
        activation_fn="swish",
        dropout=0.0,
        drop_path_rate=0.0,
    )
    peer = RetNetDecoder(ts_args, embed_tokens=torch.nn.Embedding(vocab, d)).eval()
    cfg = RetNetConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_heads=heads, intermediate_size=2 * d
    )
    ours = RetNet(cfg).eval()
    n_peer, n_ours = sum(p.numel() for p in peer.parameters()), ours.num_parameters()
    print(f"torchscale RetNetDecoder {n_peer:,} parameters, retserve {n_ours:,}", flush=True)
    rows = []
    for batch in (1, 8):
        ctx = torch.randint(0, vocab, (batch, 128))
        inc: dict = {}
        with torch.no_grad():
            for _ in range(3):  # the state exists (a later step of a running sequence)
                peer(ctx, incremental_state=inc)
            fns = {"peer": lambda ctx=ctx, inc=inc: peer(ctx, incremental_state=inc)}
            with torch.no_grad():
                _, state = ours(torch.randint(0, vocab, (batch, 128)))
            fns.update(retserve_paths(ours, batch, state, not args.no_compile))
            res = interleaved(fns, args.rounds, 20 if args.quick else 60)
        rows.append(
            {"comparison": f"torchscale 0.3.0 RetNetDecoder, B={batch} decode step", "unit": "ms", **res}
        )
        print(_row(rows[-1], _kinds(rows[-1])), flush=True)
    return rows


# ---- GPT-2 -----------------------------------------------------------------------------------------
def gpt2_rows(args: argparse.Namespace) -> list[dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    d, layers, heads, vocab = 256, 4, 4, 8192
    contexts = (128, 4096) if args.quick else (128, 4096, 16384)
    peer_cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=d,
        n_layer=layers,
        n_head=heads,
        n_positions=max(contexts) + 64,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    peer = GPT2LMHeadModel._from_config(peer_cfg, attn_implementation="sdpa").eval()
    # the RetNet block with the GPT-2 block's parameter count: 8 d^2 (q, k, v, gate, out; value dim 2d)
    # + 3 d F (gated MLP) = 12 d^2 + 13 d  ->  F = 344 at d = 256
    ffn = round((12 * d * d + 13 * d - 8 * d * d - (2 * d + 2 * d // heads)) / (3 * d))
    ours = RetNet(RetNetConfig(vocab, d, layers, heads, intermediate_size=ffn)).eval()
    n_peer = non_embedding(peer, ("wte", "wpe", "lm_head", "ln_f"))
    n_ours = non_embedding(ours, ("embeddings", "lm_head", "model.norm"))
    print(f"GPT-2 blocks {n_peer:,} parameters, retserve blocks {n_ours:,} (FFN {ffn})", flush=True)
    rows = []
    with torch.no_grad():
        for T in contexts:
            ids = torch.randint(0, vocab, (1, T))
            prefill: dict[str, Fn] = {
                "peer": lambda ids=ids: peer(ids, use_cache=True, logits_to_keep=1),
                "reference": lambda ids=ids: ours(ids, logits_to_keep=1),
            }
            if T >= 4096:
                res = interleaved(prefill, 2 if args.quick or T > 4096 else 3, 1)
                res = {k: v / 1e3 for k, v in res.items()}
                rows.append({"comparison": f"GPT-2 prefill of {T:,} tokens", "unit": "s", **res})
                print(_row(rows[-1], _kinds(rows[-1])), flush=True)
            out = peer(ids, use_cache=True, logits_to_keep=1)
            cache = out[1]  # the KV cache (`past_key_values` in transformers 4, `cache` in 5)
            _, state = ours(ids, logits_to_keep=1)
            tok = torch.randint(0, vocab, (1, 1))

            def peer_step(cache=cache, T=T, tok=tok) -> None:
                peer(tok, cache, use_cache=True)  # positional: the keyword was renamed in transformers 5
                cache.crop(-1)  # back to the context: every step decodes at context T

            fns = {"peer": peer_step, **retserve_paths(ours, 1, state, not args.no_compile)}
            res = interleaved(fns, args.rounds, 20 if args.quick else 60)
            rows.append({"comparison": f"GPT-2 with KV cache, decode at context {T:,}", "unit": "ms", **res})
            print(_row(rows[-1], _kinds(rows[-1])), flush=True)
            del cache, out
    return rows


def _kinds(r: dict) -> list[str]:
    return [k for k in ("reference", "fast", "compiled") if k in r]


def _row(r: dict, kinds: tuple[str, ...] | list[str] = ("reference", "fast", "compiled")) -> str:
    """A Markdown row; "–" where a path does not apply (a prompt is read by RetNet.forward only)."""
    cells = " | ".join(f"{r[k]:.4g} {r['unit']} ({r['peer'] / r[k]:.2f}×)" if k in r else "–" for k in kinds)
    return f"| {r['comparison']} | {r['peer']:.4g} {r['unit']} | {cells} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, contexts up to 4,096")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled decode step")
    ap.add_argument("--only", choices=["torchscale", "gpt2"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), "?")
    print(
        f"torch {torch.__version__}, {args.threads} threads, {platform.machine()} {cpu}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    rows = []
    if args.only in (None, "torchscale"):
        rows += torchscale_rows(args)
    if args.only in (None, "gpt2"):
        rows += gpt2_rows(args)
    kinds = ["reference", "fast"] + ([] if args.no_compile else ["compiled"])
    head = "| comparison | peer | " + " | ".join(f"retserve {k} (ratio)" for k in kinds) + " |"
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}\n\n{head}")
    print("|---" * (len(kinds) + 2) + "|")
    for r in rows:
        print(_row(r, kinds))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


if __name__ == "__main__":
    main()
