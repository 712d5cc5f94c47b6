"""Every fast retention path against the naive reference, final states included."""

from __future__ import annotations

import pytest
import torch

from model.ops import (
    chunk_retention,
    naive_retention,
    parallel_retention,
    recurrent_retention,
    retention_log_decay,
)

B, H, DK, DV = 2, 3, 8, 12


def _inputs(T: int, dtype: torch.dtype, seed: int = 0, with_state: bool = True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, DK, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, T, DK, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, T, DV, generator=g, dtype=torch.float64).to(dtype)
    s0 = torch.randn(B, H, DK, DV, generator=g, dtype=torch.float64).to(dtype) if with_state else None
    return q, k, v, s0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def _fast_paths():
    yield "parallel", parallel_retention
    yield "recurrent", recurrent_retention
    for cs in (1, 16, 64, 256, 37):
        yield f"chunk{cs}", lambda *a, cs=cs, **kw: chunk_retention(*a, chunk_size=cs, **kw)


FAST = list(_fast_paths())


def test_decay_values():
    lg = retention_log_decay(4)
    expected = torch.tensor([1 - 2.0**-5, 1 - 2.0**-6, 1 - 2.0**-7, 1 - 2.0**-8], dtype=torch.float64)
    torch.testing.assert_close(lg.exp(), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("T", [1, 7, 64, 513])
@pytest.mark.parametrize("name,fn", FAST, ids=[n for n, _ in FAST])
def test_fast_paths_match_reference_float64(T, name, fn):
    q, k, v, s0 = _inputs(T, torch.float64)
    o_ref, s_ref = naive_retention(q, k, v, s0)
    o, s = fn(q, k, v, s0)
    assert (o - o_ref).abs().max().item() < 1e-10
    assert (s - s_ref).abs().max().item() < 1e-10


@pytest.mark.parametrize("T", [7, 513])
@pytest.mark.parametrize("name,fn", FAST, ids=[n for n, _ in FAST])
def test_fast_paths_match_reference_float32(T, name, fn):
    q, k, v, s0 = _inputs(T, torch.float32)
    o_ref, s_ref = naive_retention(q, k, v, s0)
    o, s = fn(q, k, v, s0)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert _rel(o, o_ref) < 1e-5
    assert _rel(s, s_ref) < 1e-5


@pytest.mark.parametrize("name,fn", FAST, ids=[n for n, _ in FAST])
def test_mask_and_keep_match_reference(name, fn):
    T = 70
    q, k, v, s0 = _inputs(T, torch.float64, seed=1)
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(B, T, generator=g) > 0.3
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :9] = False  # left padding
    mask[1, -13:] = False  # right padding
    mask[1, 20:23] = False  # and a hole
    for kw in ({"keep": keep}, {"mask": mask}, {"keep": keep, "mask": mask}):
        o_ref, s_ref = naive_retention(q, k, v, s0, **kw)
        o, s = fn(q, k, v, s0, **kw)
        assert (o - o_ref).abs().max().item() < 1e-10, kw.keys()
        assert (s - s_ref).abs().max().item() < 1e-10, kw.keys()


def test_long_sequence_2048_float64():
    q, k, v, s0 = _inputs(2048, torch.float64, seed=2)
    o_ref, s_ref = recurrent_retention(q, k, v, s0)
    for fn in (parallel_retention, lambda *a: chunk_retention(*a, chunk_size=64)):
        o, s = fn(q, k, v, s0)
        assert (o - o_ref).abs().max().item() < 1e-10
        assert (s - s_ref).abs().max().item() < 1e-10


def test_dropped_token_decays_but_does_not_write():
    q, k, v, s0 = _inputs(1, torch.float64)
    keep = torch.zeros(B, 1, dtype=torch.bool)
    _, s = recurrent_retention(q, k, v, s0, keep=keep)
    gamma = retention_log_decay(H).exp()[None, :, None, None]
    torch.testing.assert_close(s, gamma * s0, rtol=0, atol=1e-15)


def test_pad_neither_decays_nor_writes():
    q, k, v, s0 = _inputs(3, torch.float64)
    mask = torch.zeros(B, 3, dtype=torch.bool)
    for fn in (naive_retention, parallel_retention, recurrent_retention, chunk_retention):
        _, s = fn(q, k, v, s0, mask=mask)
        assert torch.equal(s, s0)


def test_empty_sequence_keeps_state():
    q, k, v, s0 = _inputs(0, torch.float64)
    for fn in (parallel_retention, chunk_retention, recurrent_retention):
        o, s = fn(q, k, v, s0)
        assert o.shape == (B, H, 0, DV)
        assert torch.equal(s, s0)


def test_shape_errors_are_clear():
    q, k, v, s0 = _inputs(4, torch.float64)
    with pytest.raises(ValueError, match="initial_state"):
        parallel_retention(q, k, v, s0[:, :1])
    with pytest.raises(ValueError, match="keep"):
        chunk_retention(q, k, v, s0, keep=torch.ones(B, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_retention(q, k, v, s0, chunk_size=0)
