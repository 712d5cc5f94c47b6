"""Memory-operation benchmark (not a test): token dropping and state merging, quality and speed.

Parts (all by default; `--parts` picks some, `--quick` shrinks every part):
  drop_quality  shipped model: read 2,048 tokens of held-out text with each dropping policy at
                keep 1.0/0.75/0.5/0.25 and from_layer 0/1, NLL of the next 256 tokens; plot (PNG)
  drop_speed    prefill of 8,192 tokens at keep 0.5 vs a full read, per from_layer, vs the ideal ratio
  merge_quality shipped model: pairs of held-out documents A, B; NLL of B's continuation and of a
                passage of A after B with no state, A only, B only, A+B read in one sequence,
                merge_concat and merge_average; retained gain RG = (none - merge) / (none - concat)
  merge_speed   merging two 8k-token states vs re-reading their 16k tokens
  recall        the shipped MQAR recall model (checkpoints/retserve-recall): recall read in one
                sequence, with the pairs split over two merged states, and with 50% noise tokens
                read through each dropping policy at keep 0.5

The held-out text is the validation split of the builtin corpus tokenized with the shipped model's
tokenizer (`python -m training prepare builtin` + `tokenize`, see docs/memory.md).

Usage: python bench/bench_memory.py [--quick] [--parts drop_quality merge_speed ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import from_pretrained
from model.dropping import DropSpec, prefill_dropping
from model.memory import merge_average, merge_concat
from model.retnet import RetNet
from model.state import RetentionState
from training import mqar
from training.data import load_tokens

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("drop_quality", "drop_speed", "merge_quality", "merge_speed", "recall")
POLICIES = ("decayed", "norm", "recency", "random")
KEEPS = (1.0, 0.75, 0.5, 0.25)


# ---------------------------------------------------------------------------- held-out text


def held_out_windows(tokens_dir: Path, length: int, count: int) -> tuple[list[np.ndarray], dict[str, Any]]:
    """`count` non-overlapping windows of `length` tokens, each inside one validation document, taken
    round-robin over the documents (so that one long document does not supply them all)."""
    meta = json.loads((tokens_dir / "tokens.json").read_text())
    ids = np.asarray(load_tokens(tokens_dir, "val"), dtype=np.int64)
    cuts = np.flatnonzero(ids == int(meta["separator_id"]))
    docs = [ids[a + 1 : b] for a, b in zip(np.r_[-1, cuts[:-1]], cuts, strict=True)]
    per_doc = [[d[i : i + length] for i in range(0, len(d) - length + 1, length)] for d in docs]
    out: list[np.ndarray] = []
    doc_of: list[int] = []
    r = 0
    while len(out) < count and any(r < len(w) for w in per_doc):
        for j, w in enumerate(per_doc):
            if r < len(w) and len(out) < count:
                out.append(w[r])
                doc_of.append(j)
        r += 1
    info = {
        "val_docs": len(docs),
        "val_docs_long_enough": sum(1 for w in per_doc if w),
        "windows": len(out),
        "window_tokens": length,
        "docs_used": len(set(doc_of)),
        "doc_of_window": doc_of,
    }
    if len(out) < count:
        raise SystemExit(f"the validation split has only {len(out)} windows of {length} tokens, not {count}")
    return out, info


def continuation_nll(
    model: RetNet, state: RetentionState, first_logits: Tensor | None, cont: Tensor
) -> Tensor:
    """Mean NLL per row (B,) of `cont` (B, C) read after `state`. With `first_logits` (B, V) (the
    logits after the prefix's last token) all C tokens are scored, else cont[:, 1:]."""
    logits, _ = model(cont[:, :-1], state=state.clone())  # (B, C-1, V)
    if first_logits is not None:
        logits = torch.cat([first_logits[:, None], logits], 1)  # (B, C, V)
        target = cont
    else:
        target = cont[:, 1:]
    nll = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none")
    return nll.view(target.shape).mean(-1)  # (B,)


# ---------------------------------------------------------------------------- 1. dropping quality


def drop_quality(model: RetNet, args: argparse.Namespace) -> dict[str, Any]:
    P, C = args.prefix, args.cont
    wins, info = held_out_windows(args.tokens_dir, P + C, args.docs)
    x = torch.from_numpy(np.stack(wins))  # (N, P + C)
    prefix, cont = x[:, :P], x[:, P:]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def run(policy: str, keep: float, from_layer: int) -> dict[str, Any]:
        nll, kept = [], []
        for i in range(0, len(wins), args.batch):
            spec = DropSpec(
                policy=policy, keep=keep, sinks=args.sinks, recent=args.recent, from_layer=from_layer, seed=i
            )
            res = prefill_dropping(model, prefix[i : i + args.batch], spec)
            nll.append(continuation_nll(model, res.state, res.logits, cont[i : i + args.batch]))
            kept.append(res.keep.float().mean(-1))
        n = torch.cat(nll)
        return {
            "policy": policy,
            "keep": keep,
            "from_layer": from_layer,
            "nll": float(n.mean()),
            "nll_per_doc": [round(float(v), 4) for v in n],
            "kept_fraction": float(torch.cat(kept).mean()),
        }

    with torch.inference_mode():
        full = run("recency", 1.0, 0)
        full["policy"] = "none (keep 1.0)"
        rows.append(full)
        print(f"  keep 1.0: NLL {full['nll']:.4f} over {len(wins)} windows x {C} tokens")
        for from_layer in args.from_layers:
            for policy in POLICIES:
                for keep in KEEPS[1:]:
                    r = run(policy, keep, from_layer)
                    r["rel_to_full"] = r["nll"] / full["nll"] - 1.0
                    rows.append(r)
                    print(
                        f"  from_layer={from_layer} {policy:8s} keep={keep:.2f}: NLL {r['nll']:.4f} "
                        f"({100 * r['rel_to_full']:+.2f}%), kept {r['kept_fraction']:.3f}"
                    )
    out = {"data": info, "prefix": P, "cont": C, "rows": rows, "wall_s": time.perf_counter() - t0}
    if args.plot:
        extra = [json.loads(p.read_text())["drop_quality"] for p in args.plot_with]
        plot_drop_quality([out, *extra], args.plot)
        out["plot"] = str(args.plot)
    return out


def plot_drop_quality(results: list[dict[str, Any]], path: Path) -> None:
    """NLL change (%) vs keep per policy: one row per drop_quality result, one column per from_layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["from_layer"] for r in results[0]["rows"][1:]})
    fig, axes = plt.subplots(
        len(results), len(layers), figsize=(5.2 * len(layers), 3.6 * len(results)), squeeze=False
    )
    for row_axes, res in zip(axes, results, strict=True):
        rows, full = res["rows"], res["rows"][0]["nll"]
        for ax, fl in zip(row_axes, layers, strict=True):
            for policy in POLICIES:
                pts = sorted(
                    (
                        (r["keep"], r["nll"])
                        for r in rows[1:]
                        if r["from_layer"] == fl and r["policy"] == policy
                    ),
                    reverse=True,
                )
                ks = [1.0] + [k for k, _ in pts]
                rel = [0.0] + [100 * (n / full - 1) for _, n in pts]
                ax.plot(ks, rel, marker="o", label=policy)
            ax.axhline(0.0, color="grey", lw=0.8)
            ax.set_title(
                f"{res['prefix']}-token prompt, from_layer = {fl} (keep 1.0: {full:.3f} nats)", fontsize=9
            )
            ax.set_xlabel("keep (fraction of prompt tokens written to the state)", fontsize=8)
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
        row_axes[0].set_ylabel(f"NLL of the next {res['cont']} tokens,\n% vs keep 1.0", fontsize=8)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(
        f"Token dropping on retserve-small ({results[0]['data']['windows']} held-out windows; "
        "goals: keep 0.75 within +2%, keep 0.5 within +5%)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- 2. dropping speed


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def drop_speed(model: RetNet, args: argparse.Namespace) -> dict[str, Any]:
    T, L = args.speed_tokens, model.config.num_hidden_layers
    x = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    keep = 0.5
    rows = []
    with torch.inference_mode():
        full = lambda: model(x, logits_to_keep=1)  # noqa: E731
        full()  # warm-up
        fns: dict[str, Callable[[], object]] = {"full": full}
        for fl in range(L):
            spec = DropSpec(
                policy=args.speed_policy, keep=keep, sinks=args.sinks, recent=args.recent, from_layer=fl
            )
            fns[f"from_layer={fl}"] = lambda spec=spec: prefill_dropping(model, x, spec)
            fns[f"from_layer={fl}"]()  # warm-up
        # Interleaved repeats: machine noise (other processes) hits every variant alike.
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                times[k].append(_median_s(fn, 1))
    t_full = statistics.median(times["full"])
    print(f"  full read of {T} tokens: {t_full:.3f} s (median of {args.repeats})")
    for fl in range(L):
        t = statistics.median(times[f"from_layer={fl}"])
        ideal = (fl + (L - fl) * keep) / L
        row = {"from_layer": fl, "keep": keep, "s": t, "ratio": t / t_full, "ideal_ratio": ideal}
        row["within_10pct_of_ideal"] = row["ratio"] <= ideal * 1.10
        rows.append(row)
        print(f"  keep {keep} from_layer={fl}: {t:.3f} s = {t / t_full:.3f}x of full (ideal {ideal:.3f}x)")
    return {
        "tokens": T,
        "policy": args.speed_policy,
        "full_s": t_full,
        "rows": rows,
        "runs_s": {k: [round(v, 4) for v in vs] for k, vs in times.items()},
    }


# ---------------------------------------------------------------------------- 3. merge quality


def merge_quality(model: RetNet, args: argparse.Namespace) -> dict[str, Any]:
    S, C = args.merge_segment, args.cont
    wins, info = held_out_windows(args.tokens_dir, S + C, 2 * args.pairs + 8)
    doc_of = info["doc_of_window"]
    # Pairs (A, B) from different documents: A = window i, B = the next window of another document.
    pairs: list[tuple[int, int]] = []
    used: set[int] = set()
    for i in range(len(wins)):
        if i in used:
            continue
        j = next((j for j in range(i + 1, len(wins)) if j not in used and doc_of[j] != doc_of[i]), None)
        if j is not None:
            pairs.append((i, j))
            used.update((i, j))
        if len(pairs) == args.pairs:
            break
    A = torch.from_numpy(np.stack([wins[i][:S] for i, _ in pairs]))  # (N, S)
    B = torch.from_numpy(np.stack([wins[j][:S] for _, j in pairs]))  # (N, S)
    b_cont = torch.from_numpy(np.stack([wins[j][S : S + C] for _, j in pairs]))  # (N, C)
    a_pass = A[:, : min(C, S)]  # (N, C): the start of A, read again after B
    N = len(pairs)
    t0 = time.perf_counter()
    with torch.inference_mode():
        _, sA = model(A)
        _, sB = model(B)
        _, sAB = model(B, state=sA.clone())
        rows_a, rows_b = sA.split(), sB.split()
        t_m = time.perf_counter()
        s_cat = RetentionState.stack([merge_concat([a, b]) for a, b in zip(rows_a, rows_b, strict=True)])
        s_avg = RetentionState.stack([merge_average([a, b]) for a, b in zip(rows_a, rows_b, strict=True)])
        merge_s = time.perf_counter() - t_m
        states = {
            "none": model.empty_state(N),
            "A only": sA,
            "B only": sB,
            "A+B read": sAB,
            "merge_concat": s_cat,
            "merge_average": s_avg,
        }
        targets = {"B continuation": b_cont, "A passage after B": a_pass}
        nll = {
            t: {k: continuation_nll(model, s, None, y) for k, s in states.items()} for t, y in targets.items()
        }
    out: dict[str, Any] = {
        "pairs": N,
        "segment_tokens": S,
        "target_tokens": C,
        "data": {k: v for k, v in info.items() if k != "doc_of_window"},
        "merge_s_total": merge_s,
    }
    for t, by_state in nll.items():
        means = {k: float(v.mean()) for k, v in by_state.items()}
        gain = means["none"] - means["A+B read"]
        rg = {
            k: (means["none"] - means[k]) / gain
            for k in ("merge_concat", "merge_average", "A only", "B only")
        }
        out[t] = {"nll": means, "retained_gain": rg, "concat_gain_nats": gain}
        print(f"  {t}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
        print("    RG: " + ", ".join(f"{k} {v:.3f}" for k, v in rg.items()))
    out["wall_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------- 4. merge speed


def merge_speed(model: RetNet, args: argparse.Namespace) -> dict[str, Any]:
    T = args.merge_tokens
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
    b = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
    ab = torch.cat([a, b], 1)  # (1, 2T)
    with torch.inference_mode():
        _, sa = model(a)
        _, sb = model(b)
        merge_concat([sa, sb])  # warm-up
        t_cat = _median_s(lambda: merge_concat([sa, sb]), args.merge_repeats)
        t_avg = _median_s(lambda: merge_average([sa, sb]), args.merge_repeats)
        t_read = _median_s(lambda: model(ab, logits_to_keep=1), max(1, args.repeats // 2))
    out = {
        "tokens_per_state": T,
        "merge_concat_ms": 1000 * t_cat,
        "merge_average_ms": 1000 * t_avg,
        "reread_s": t_read,
        "speedup_concat": t_read / t_cat,
        "speedup_average": t_read / t_avg,
    }
    print(
        f"  merge_concat of two {T}-token states: {1000 * t_cat:.3f} ms, average {1000 * t_avg:.3f} ms; "
        f"re-reading {2 * T} tokens: {t_read:.3f} s -> {out['speedup_concat']:,.0f}x"
    )
    return out


# ---------------------------------------------------------------------------- 5. recall


def _spec_of(model_dir: Path) -> tuple[mqar.MQARSpec, dict[str, Any]]:
    card = json.loads((model_dir / "mqar.json").read_text())
    return mqar.MQARSpec(**card["spec"]), card


def retrain_recall(out_dir: Path) -> Path:
    """Retrain the recall model with the recorded commands (slow: tens of CPU minutes); returns its dir."""
    card = json.loads((ROOT / "checkpoints/retserve-recall/mqar.json").read_text())
    for cmd in card["commands"]:
        cmd = cmd.replace("/ABS", str(out_dir)).replace("python -m", f"{sys.executable} -m", 1)
        print("  $", cmd)
        subprocess.run(cmd, shell=True, check=True, cwd=ROOT)
    return out_dir / "export"


def recall(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = retrain_recall(args.retrain_dir) if args.retrain_recall else args.recall_model
    model = from_pretrained(model_dir).eval()
    spec, _ = _spec_of(model_dir)
    n = args.recall_examples
    P = spec.num_pairs
    out: dict[str, Any] = {"model": str(model_dir), "examples": n, "pairs": P, "spec": spec.__dict__}
    with torch.inference_mode():
        # (a) one sequence vs two separately primed states (first / second half of the pairs)
        ex = mqar.make_examples(spec, n, seed=args.seed)
        one = mqar.answer_hits(model, mqar.read_contexts(model, ex), ex)  # (N, Q)
        h = P // 2
        first = [mqar.MQARExample(e.pairs[:h], _context(spec, e.pairs[:h]), [], e.queries) for e in ex]
        second = [mqar.MQARExample(e.pairs[h:], _context(spec, e.pairs[h:]), [], e.queries) for e in ex]
        s1, s2 = mqar.read_contexts(model, first), mqar.read_contexts(model, second)
        r1, r2 = s1.split(), s2.split()
        s_cat = RetentionState.stack([merge_concat([a, b]) for a, b in zip(r1, r2, strict=True)])
        s_avg = RetentionState.stack([merge_average([a, b]) for a, b in zip(r1, r2, strict=True)])
        split = {
            "one sequence": one,
            "merge_concat": mqar.answer_hits(model, s_cat, ex),
            "merge_average": mqar.answer_hits(model, s_avg, ex),
            "first half only": mqar.answer_hits(model, s1, ex),
            "second half only": mqar.answer_hits(model, s2, ex),
        }
        out["split"] = {k: float(v.float().mean()) for k, v in split.items()}
        out["split"]["concat_vs_one"] = out["split"]["merge_concat"] / out["split"]["one sequence"]
        out["split"]["average_vs_one"] = out["split"]["merge_average"] / out["split"]["one sequence"]
        print("  split over two states: " + ", ".join(f"{k} {v:.3f}" for k, v in out["split"].items()))

        # (b) 50% noise tokens between pairs, read through each dropping policy at keep 0.5
        noisy = mqar.make_examples(spec, n, seed=args.seed + 1, noise_ratio=0.5)
        oracle = torch.tensor([[not z for z in e.is_noise] for e in noisy])  # (N, T): drop exactly the noise
        drop: dict[str, Any] = {
            "context_tokens": len(noisy[0].context),
            "all tokens": _acc(model, mqar.read_contexts(model, noisy), noisy),
            "clean (no noise)": float(one.float().mean()),
        }
        for fl in range(model.config.num_hidden_layers):
            drop[f"oracle (drop exactly the noise), from_layer={fl}"] = _acc(
                model, model(_ctx(noisy), keep=oracle, keep_from_layer=fl)[1], noisy
            )
            for policy in POLICIES:
                spec_d = DropSpec(policy=policy, keep=0.5, sinks=1, recent=0, from_layer=fl, seed=args.seed)
                res = prefill_dropping(model, _ctx(noisy), spec_d)
                noise_kept = float((res.keep & ~oracle).sum() / (~oracle).sum())
                drop[f"{policy}, from_layer={fl}"] = _acc(model, res.state, noisy)
                drop[f"{policy}, from_layer={fl}: noise kept"] = noise_kept
        out["noise_drop"] = drop
        print("  50% noise, keep 0.5: " + ", ".join(f"{k} {v:.3f}" for k, v in drop.items()))
    return out


def _context(spec: mqar.MQARSpec, pairs: list[tuple[int, int]]) -> list[int]:
    return [mqar.BOS] + [t for k, v in pairs for t in spec.pair_tokens(k, v)]


def _ctx(examples: list[mqar.MQARExample]) -> Tensor:
    return torch.tensor([e.context for e in examples], dtype=torch.long)  # (N, T)


def _acc(model: RetNet, state: RetentionState, examples: list[mqar.MQARExample]) -> float:
    return float(mqar.answer_hits(model, state, examples).float().mean())


# ---------------------------------------------------------------------------- main


def goals(res: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, met or not, from whatever parts ran."""
    g: dict[str, Any] = {}
    if "drop_quality" in res:
        rows = res["drop_quality"]["rows"][1:]
        best = {}
        for keep in (0.75, 0.5, 0.25):
            cands = [r for r in rows if r["keep"] == keep and r["policy"] not in ("random", "recency")]
            b = min(cands, key=lambda r: r["nll"])
            base = min(r["nll"] for r in rows if r["keep"] == keep and r["policy"] in ("random", "recency"))
            best[keep] = (b, base)
        g["keep0.75_within_2pct"] = best[0.75][0]["rel_to_full"] <= 0.02
        g["keep0.5_within_5pct"] = best[0.5][0]["rel_to_full"] <= 0.05
        for keep in (0.5, 0.25):
            b, base = best[keep]
            g[f"best_beats_random_and_recency_at_{keep}"] = b["nll"] < base
        g["best_policy_per_keep"] = {
            str(k): f"{b['policy']} from_layer={b['from_layer']} ({100 * b['rel_to_full']:+.2f}%)"
            for k, (b, _) in best.items()
        }
    if "drop_speed" in res:
        fl1 = [r for r in res["drop_speed"]["rows"] if r["from_layer"] == 1]
        if fl1:
            g["prefill_keep0.5_from_layer1_within_10pct_of_ideal"] = fl1[0]["within_10pct_of_ideal"]
    if "merge_quality" in res:
        g["concat_RG_ge_0.5"] = res["merge_quality"]["B continuation"]["retained_gain"]["merge_concat"] >= 0.5
    if "recall" in res:
        g["concat_merge_recall_ge_80pct_of_one_sequence"] = res["recall"]["split"]["concat_vs_one"] >= 0.8
    if "merge_speed" in res:
        g["merge_ge_50x_faster_than_reread"] = res["merge_speed"]["speedup_concat"] >= 50
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--skip", nargs="+", choices=PARTS, default=[], help="parts to leave out")
    ap.add_argument("--quick", action="store_true", help="fewer documents, tokens and repeats (a smoke run)")
    ap.add_argument("--model", type=Path, default=ROOT / "checkpoints/retserve-small")
    ap.add_argument(
        "--tokens-dir",
        type=Path,
        default=ROOT / "data/builtin/tokens",
        help="the builtin corpus tokenized with the shipped model's tokenizer",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--docs", type=int, default=24, help="held-out windows for drop_quality")
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--cont", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="rows per forward in the quality parts")
    ap.add_argument("--from-layers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--speed-tokens", type=int, default=8192)
    ap.add_argument("--speed-policy", default="decayed", choices=POLICIES)
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (medians)")
    ap.add_argument("--pairs", type=int, default=12, help="document pairs for merge_quality")
    ap.add_argument("--merge-segment", type=int, default=512, help="tokens of A and of B")
    ap.add_argument("--merge-tokens", type=int, default=8192, help="tokens per state for merge_speed")
    ap.add_argument("--merge-repeats", type=int, default=50)
    ap.add_argument("--recall-model", type=Path, default=ROOT / "checkpoints/retserve-recall")
    ap.add_argument("--recall-examples", type=int, default=1000)
    ap.add_argument("--retrain-recall", action="store_true", help="retrain the recall model first (slow)")
    ap.add_argument("--retrain-dir", type=Path, default=ROOT / "runs/recall-bench")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument(
        "--plot", type=Path, default=None, help="default docs/memory_dropping.png (--quick: runs/...)"
    )
    ap.add_argument(
        "--plot-with",
        type=Path,
        nargs="*",
        default=[],
        help="bench JSON files whose drop_quality to plot too",
    )
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from --json and --plot-with")
    ap.add_argument("--json", type=Path, default=ROOT / "runs/bench_memory.json")
    args = ap.parse_args()
    if args.quick:
        args.docs, args.prefix, args.cont, args.speed_tokens = 4, 512, 64, 2048
        args.repeats, args.pairs, args.merge_tokens, args.merge_repeats = 2, 3, 2048, 10
        args.recall_examples = 200
    if args.plot is None:
        args.plot = ROOT / ("runs/memory_dropping_quick.png" if args.quick else "docs/memory_dropping.png")
    if args.replot:
        results = [json.loads(p.read_text())["drop_quality"] for p in [args.json, *args.plot_with]]
        plot_drop_quality(results, args.plot)
        print(f"wrote {args.plot}")
        return
    torch.set_num_threads(args.threads)
    parts = [p for p in args.parts if p not in args.skip]
    res: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "quick": args.quick,
    }
    print(f"torch {torch.__version__}, {res['threads']} threads, {res['cores']} cores; parts {parts}")
    shipped = from_pretrained(args.model).eval() if set(parts) - {"recall"} else None
    for part in parts:
        print(f"[{part}]")
        t0 = time.perf_counter()
        fn = {
            "drop_quality": drop_quality,
            "drop_speed": drop_speed,
            "merge_quality": merge_quality,
            "merge_speed": merge_speed,
        }.get(part)
        res[part] = recall(args) if part == "recall" else fn(shipped, args)  # type: ignore[misc]
        res[part]["part_wall_s"] = time.perf_counter() - t0
    res["goals"] = goals(res)
    print("goals:", json.dumps(res["goals"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
