"""Token dropping: DropSpec validation, the four policies' keep masks, and the compact prefill against
the keep-mask form (float64 1e-10, float32 1e-5 relative; ragged batches, resumed states)."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import preset
from model.dropping import POLICIES, DropSpec, keep_mask, prefill_dropping, token_scores
from model.ops import (
    chunk_retention,
    naive_retention,
    parallel_retention,
    recurrent_retention,
    retention_log_decay,
)
from model.retnet import RetNet
from model.state import RetentionState
from tests.support.models import random_ids, random_model


def _model(dtype: torch.dtype, **kw) -> RetNet:
    return random_model(dtype, num_hidden_layers=3, **kw)


@pytest.fixture(scope="module")
def m64() -> RetNet:
    return _model(torch.float64, num_kv_heads=1)  # GQA covered too


@pytest.fixture(scope="module")
def m32() -> RetNet:
    return _model(torch.float32)


def _ragged(T: int) -> torch.Tensor:
    mask = torch.ones(3, T, dtype=torch.long)
    mask[0, :17] = 0  # left padding
    mask[1, -29:] = 0  # right padding
    mask[2, 40:46] = 0  # a hole
    return mask


def _resumed(m: RetNet) -> RetentionState:
    with torch.inference_mode():
        return RetentionState.stack([m(random_ids(1, n, 50 + n))[1] for n in (3, 1, 70)])


def _last_real(mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor:
    if mask is None:
        return torch.full((B,), T - 1)
    return torch.where(mask.bool(), torch.arange(T), -1).amax(-1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _compare(m: RetNet, spec: DropSpec, ids, state, mask, tol: float, relative: bool, chunk_size: int = 16):
    with torch.inference_mode():
        r = prefill_dropping(m, ids, spec, state, mask, chunk_size=chunk_size)
        B, T = ids.shape
        logits, ref = m(ids, state, mask, keep=r.keep, keep_from_layer=spec.from_layer, chunk_size=chunk_size)
    ref_logits = logits[torch.arange(B), _last_real(mask, B, T)]
    err = _rel if relative else (lambda a, b: (a.double() - b.double()).abs().max().item())
    assert err(r.logits, ref_logits) < tol
    assert torch.equal(r.state.position, ref.position)
    for a, b in zip(r.state.layers, ref.layers, strict=True):
        assert err(a, b) < tol
    real = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    assert not bool((r.keep & ~real).any())
    assert torch.equal(r.dropped, (real & ~r.keep).sum(-1))
    return r


# ---- DropSpec ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(policy="lru"), "policy must be one of"),
        (dict(keep=0.0), "0 < keep <= 1"),
        (dict(keep=1.5), "0 < keep <= 1"),
        (dict(keep=float("nan")), "0 < keep <= 1"),
        (dict(keep="0.5"), "0 < keep <= 1"),
        (dict(keep=True), "0 < keep <= 1"),
        (dict(sinks=-1), "sinks must be an integer >= 0"),
        (dict(recent=2.0), "recent must be an integer"),
        (dict(from_layer=True), "from_layer must be an integer"),
        (dict(seed=-3), "seed must be an integer >= 0"),
    ],
)
def test_spec_validation(kw, match):
    args = dict(policy="decayed", keep=0.5) | kw
    with pytest.raises(ValueError, match=match):
        DropSpec(**args)


def test_spec_check_from_layer():
    cfg = preset("tiny")  # 2 layers
    DropSpec("norm", 0.5, from_layer=1).check(cfg)
    with pytest.raises(ValueError, match=r"from_layer must be in \[0, 1\]"):
        DropSpec("norm", 0.5, from_layer=2).check(cfg)
    assert DropSpec("random", 1).keep == 1


# ---- keep masks -------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_counts_sinks_recent_and_last_token(policy):
    T = 100
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, T, generator=g, dtype=torch.float64)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :30] = 0  # 70 real tokens, left-padded
    spec = DropSpec(policy, 0.3, sinks=3, recent=5, seed=7)
    keep = keep_mask(spec, scores, mask, T)
    assert keep.shape == (2, T) and keep.dtype == torch.bool
    assert keep.sum(-1).tolist() == [30, 21]  # ceil(0.3 * 100), ceil(0.3 * 70)
    assert keep[0, :3].all() and keep[0, -5:].all()
    assert keep[1, 30:33].all() and keep[1, -5:].all()
    assert not keep[1, :30].any()  # pads are never kept
    # forced tokens beyond the budget: count = max(ceil(keep * n), forced)
    many = keep_mask(DropSpec(policy, 0.05, sinks=4, recent=10), scores, None, T)
    assert many.sum(-1).tolist() == [14, 14]
    # the last token is kept even with recent = 0 and sinks = 0
    one = keep_mask(DropSpec(policy, 0.01, sinks=0, recent=0), scores, mask, T)
    assert one.sum(-1).tolist() == [1, 1] and one[:, -1].all()


def test_keep_fraction_is_a_definite_count():
    for n, keep, expected in [(10, 0.3, 3), (10, 0.31, 4), (7, 0.5, 4), (1, 0.01, 1), (64, 1.0, 64)]:
        k = keep_mask(DropSpec("recency", keep, sinks=0, recent=0), None, None, n)
        assert int(k.sum()) == expected == math.ceil(round(keep * n, 9)), (n, keep)


def test_recency_keeps_the_last_tokens():
    k = keep_mask(DropSpec("recency", 0.5, sinks=2, recent=0), None, None, 10)
    assert k[0].tolist() == [True, True] + [False] * 5 + [True] * 3  # 5 kept, sinks included
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])  # right-padded: the last real token is index 5
    k = keep_mask(DropSpec("recency", 0.5, sinks=0, recent=0), None, mask, 8)
    assert k[0].tolist() == [False] * 3 + [True] * 3 + [False] * 2


def test_scores_rank_the_middle():
    scores = torch.tensor([[0.0, 5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 0.0]], dtype=torch.float64)
    k = keep_mask(DropSpec("norm", 0.5, sinks=1, recent=1), scores, None, 8)
    assert k[0].tolist() == [True, True, False, True, False, False, False, True]
    with pytest.raises(ValueError, match="needs scores"):
        keep_mask(DropSpec("decayed", 0.5), None, None, 8)


def test_random_is_seeded_and_batch_independent():
    mask = torch.ones(3, 200, dtype=torch.long)
    mask[1, :50] = 0
    a = keep_mask(DropSpec("random", 0.4, sinks=0, recent=0, seed=3), None, mask, 200)
    b = keep_mask(DropSpec("random", 0.4, sinks=0, recent=0, seed=3), None, mask, 200)
    c = keep_mask(DropSpec("random", 0.4, sinks=0, recent=0, seed=4), None, mask, 200)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], c[0])
    assert torch.equal(a[0], a[2])  # a row depends on its own tokens and the seed only
    assert torch.equal(a[1, 50:], keep_mask(DropSpec("random", 0.4, 0, 0, seed=3), None, None, 150)[0])
    assert a.sum(-1).tolist() == [80, 60, 80]


def test_token_scores_match_their_definition():
    g = torch.Generator().manual_seed(2)
    B, T, H, Hkv = 2, 9, 4, 2
    k = torch.randn(B, T, Hkv, 6, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, Hkv, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -3:] = False  # right padding: row 1's last real token is index 5
    gamma = retention_log_decay(H).exp()
    norm = token_scores("norm", k, v, mask, H).exp()
    decayed = token_scores("decayed", k, v, mask, H).exp()
    last = [8, 5]
    for b in range(B):
        for t in range(last[b] + 1):
            per_head = [k[b, t, h // 2].norm() * v[b, t, h // 2].norm() for h in range(H)]
            assert math.isclose(norm[b, t], sum(per_head), rel_tol=1e-12)
            want = sum(gamma[h] ** (last[b] - t) * per_head[h] for h in range(H))
            assert math.isclose(decayed[b, t], want, rel_tol=1e-12)


# ---- compact prefill == keep-mask form ----------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("from_layer", [0, 1])
def test_compact_equals_keep_mask_float64(m64, policy, from_layer):
    T = 120
    spec = DropSpec(policy, 0.4, sinks=2, recent=5, from_layer=from_layer, seed=1)
    # plain batch, then ragged and resumed
    r = _compare(m64, spec, random_ids(2, T, 1), None, None, 1e-10, False)
    assert r.dropped.tolist() == [72, 72]
    r = _compare(m64, spec, random_ids(3, T, 2), _resumed(m64), _ragged(T), 1e-10, False, chunk_size=13)
    assert r.dropped.tolist() == [61, 54, 68]  # real 103, 91, 114 -> kept ceil(0.4 n)


@pytest.mark.parametrize("policy", ["decayed", "random"])
@pytest.mark.parametrize("from_layer", [0, 1])
def test_compact_equals_keep_mask_float32(m32, policy, from_layer):
    T = 200
    spec = DropSpec(policy, 0.5, sinks=4, recent=8, from_layer=from_layer)
    _compare(m32, spec, random_ids(3, T, 3), _resumed(m32), _ragged(T), 1e-5, True, chunk_size=32)


def test_last_layer_and_single_token(m64):
    _compare(
        m64,
        DropSpec("norm", 0.3, from_layer=2),
        random_ids(2, 90, 4),
        _resumed(m64).select([0, 2]),
        None,
        1e-10,
        False,
    )
    r = _compare(m64, DropSpec("norm", 0.3), random_ids(2, 1, 5), None, None, 1e-10, False)
    assert r.keep.all() and r.dropped.tolist() == [0, 0]


def test_compact_path_shrinks_the_upper_layers(m64):
    seen: list[tuple[int, int]] = []
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, i=i: seen.append((i, args[0].shape[1])))
        for i, layer in enumerate(m64.model.layers)
    ]
    try:
        with torch.inference_mode():
            prefill_dropping(m64, random_ids(1, 100, 6), DropSpec("decayed", 0.25, sinks=4, recent=4))
    finally:
        for h in hooks:
            h.remove()
    assert seen == [(0, 100), (1, 25), (2, 25)]


@pytest.mark.parametrize("mask", [None, "left", "right"])
def test_keep_one_is_the_plain_forward_bit_for_bit(m32, mask):
    T = 50
    ids = random_ids(3, T, 7)
    am = None
    if mask is not None:
        am = torch.ones(3, T, dtype=torch.long)
        am[1, :9] = 0 if mask == "left" else 1
        am[1, -9:] = 0 if mask == "right" else 1
    st = _resumed(m32)
    with torch.inference_mode():
        r = prefill_dropping(m32, ids, DropSpec("decayed", 1.0), st, am)
        logits, ref = m32(ids, st, am)
        # the last position's logits alone, as a prompt read computes them (a (B, 1, D) @ (D, V) GEMM may
        # round differently from the (B, T, D) one on some CPUs, so compare like with like)
        last, _ = m32(ids, st, am, logits_to_keep=1)
    if mask == "right":
        assert torch.equal(r.logits, logits[torch.arange(3), _last_real(am, 3, T)])
    else:
        assert torch.equal(r.logits, last[:, -1])
        torch.testing.assert_close(r.logits, logits[:, -1], rtol=1e-5, atol=1e-6)
    assert r.state.equal(ref)
    assert r.dropped.tolist() == [0, 0, 0]


def test_bad_inputs(m64):
    spec = DropSpec("recency", 0.5)
    with pytest.raises(ValueError, match="from_layer must be in"):
        prefill_dropping(m64, random_ids(1, 5, 0), DropSpec("recency", 0.5, from_layer=3))
    with pytest.raises(ValueError, match="at least one token"):
        prefill_dropping(m64, random_ids(1, 0, 0), spec)
    with pytest.raises(ValueError, match="all-pad row"):
        prefill_dropping(
            m64, random_ids(2, 4, 0), spec, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
        )
    with pytest.raises(ValueError, match="attention_mask"):
        prefill_dropping(m64, random_ids(1, 4, 0), spec, attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        prefill_dropping(m64, random_ids(1, 4, 0), spec, chunk_size=0)
    with pytest.raises(ValueError, match="keep_from_layer"):
        m64(random_ids(1, 4, 0), keep_from_layer=3)


# ---- the ops' decay_steps (gaps of a compacted sequence) ----------------------------------------
def _op_inputs(T: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    v = torch.randn(2, 3, T, 6, generator=g, dtype=torch.float64).to(dtype)
    s0 = torch.randn(2, 3, 8, 6, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, s0


# gap 4000: chunk 16 runs the factored form with overflowing entries above the diagonal (masked),
# chunk 37 spans too many steps for it and takes the exact per-chunk fallback.
@pytest.mark.parametrize("gap", [3, 4000])
@pytest.mark.parametrize("cs", [1, 16, 37])
def test_decay_steps_in_every_form_match_the_reference(gap, cs):
    T = 75
    q, k, v, s0 = _op_inputs(T, torch.float64, 8)
    steps = torch.randint(1, gap + 1, (2, T), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, -10:] = False  # right pads of a compacted ragged batch
    o_ref, s_ref = naive_retention(q, k, v, s0, mask=mask, decay_steps=steps)
    for fn in (
        parallel_retention,
        recurrent_retention,
        lambda *a, **kw: chunk_retention(*a, chunk_size=cs, **kw),
    ):
        o, s = fn(q, k, v, s0, mask=mask, decay_steps=steps)
        real = mask[:, None, :, None].expand_as(o)
        assert (o - o_ref)[real].abs().max().item() < 1e-10
        assert (s - s_ref).abs().max().item() < 1e-10


def test_decay_steps_of_ones_equal_no_steps_float32():
    q, k, v, s0 = _op_inputs(200, torch.float32, 10)
    o_ref, s_ref = chunk_retention(q, k, v, s0)
    o, s = chunk_retention(q, k, v, s0, decay_steps=torch.ones(2, 200, dtype=torch.long))
    assert _rel(o, o_ref) < 1e-5 and _rel(s, s_ref) < 1e-5
    with pytest.raises(ValueError, match="decay_steps must be >= 0"):
        chunk_retention(q, k, v, s0, decay_steps=-torch.ones(2, 200, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        chunk_retention(q, k, v, s0, decay_steps=torch.ones(2, 200))
