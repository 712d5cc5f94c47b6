"""Model core on each device, float32 and bf16 weights (states always float32): the three forms, decoding
step by step, rows at different positions and the compact token-dropping prefill all agree with a float64
reference of the same weights within the rounding bound of tests/cuda/common.py."""

from __future__ import annotations

import pytest
import torch

from model.dropping import DropSpec, prefill_dropping
from model.state import RetentionState
from tests.cuda.common import DEVICES, random_model, rel_err, tolerance
from tests.support.models import random_ids

DTYPES = [torch.float32, torch.bfloat16]
FORMS = [("parallel", 64), ("chunk", 16), ("chunk", 37), ("chunk", 64), ("recurrent", 64)]


def _check_state(state: RetentionState, ref: RetentionState, tol: float) -> None:
    assert torch.equal(state.position.cpu(), ref.position)
    for i, (a, b) in enumerate(zip(state.layers, ref.layers, strict=True)):
        assert a.dtype == torch.float32, (i, a.dtype)  # fp32 states whatever the weights' dtype
        err = rel_err(a, b)
        assert err < tol, (i, err, tol)


@torch.inference_mode()
@pytest.mark.parametrize("T", [7, 513])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_forms_agree_with_float64(device, dtype, T):
    m, ref = random_model(device, dtype, num_kv_heads=1)  # GQA covered too
    ids = random_ids(2, T, seed=1)
    ref_logits, ref_state = ref(ids, mode="parallel")
    tol = tolerance(dtype, m.config.num_hidden_layers, accumulation=T + m.config.ffn_size)
    for mode, cs in FORMS:
        logits, state = m(ids.to(device), mode=mode, chunk_size=cs)
        assert logits.dtype == dtype and logits.device.type == device
        err = rel_err(logits, ref_logits)
        assert err < tol, (mode, cs, err, tol)
        _check_state(state, ref_state, tol)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_prefill_then_steps_equals_one_pass(device, dtype):
    m, ref = random_model(device, dtype)
    ids = random_ids(2, 90, seed=4)
    full_logits, full_state = ref(ids, mode="parallel")
    tol = tolerance(dtype, m.config.num_hidden_layers, accumulation=90 + m.config.ffn_size)
    logits, state = m(ids[:, :50].to(device), mode="chunk", chunk_size=16)
    steps = [logits]
    for t in range(50, 90):
        lg, state = m(ids[:, t : t + 1].to(device), state=state)  # auto: one recurrent step
        steps.append(lg)
    assert rel_err(torch.cat(steps, 1), full_logits) < tol
    _check_state(state, full_state, tol)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_rows_at_different_positions_equal_rows_alone(device, dtype):
    m, ref = random_model(device, dtype)
    prompts = [random_ids(1, n, seed=10 + n) for n in (3, 40, 129)]
    batch_state = RetentionState.stack([m(p.to(device), mode="chunk")[1] for p in prompts])
    assert batch_state.position.tolist() == [3, 40, 129]
    nxt = random_ids(3, 5, seed=99)
    tol = tolerance(dtype, m.config.num_hidden_layers, accumulation=140 + m.config.ffn_size)
    for mode in ("recurrent", "chunk", "parallel"):
        logits, out_state = m(nxt.to(device), state=batch_state, mode=mode)
        for i, p in enumerate(prompts):
            whole_logits, whole_state = ref(torch.cat([p, nxt[i : i + 1]], 1), mode="parallel")
            assert rel_err(logits[i : i + 1], whole_logits[:, -5:]) < tol, (mode, i)
            _check_state(out_state.select([i]), whole_state, tol)


@torch.inference_mode()
@pytest.mark.parametrize("policy", ["decayed", "random"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_compact_dropping_equals_keep_mask(device, dtype, policy):
    """prefill_dropping (the compact form) on the device == the keep-mask form, with the keep mask the
    device chose, in float64 (ragged rows, resumed states)."""
    m, ref = random_model(device, dtype, num_hidden_layers=3)
    T = 160
    ids = random_ids(3, T, seed=3)
    mask = torch.ones(3, T, dtype=torch.long)  # (B, T)
    mask[0, :17] = 0  # left padding
    mask[1, -29:] = 0  # right padding
    mask[2, 40:46] = 0  # a hole
    starts = [random_ids(1, n, seed=50 + n) for n in (3, 1, 70)]
    state = RetentionState.stack([m(s.to(device))[1] for s in starts])
    ref_state0 = RetentionState.stack([ref(s)[1] for s in starts])
    spec = DropSpec(policy, 0.5, sinks=4, recent=8, from_layer=1)
    r = prefill_dropping(m, ids.to(device), spec, state, mask.to(device), chunk_size=32)
    keep = r.keep.cpu()
    assert not bool((keep & ~mask.bool()).any())  # pads are never kept
    assert torch.equal(r.dropped.cpu(), (mask.bool() & ~keep).sum(-1))
    logits, ref_state = ref(ids, ref_state0, mask, keep=keep, keep_from_layer=1, chunk_size=32)
    last = torch.where(mask.bool(), torch.arange(T), -1).amax(-1)  # (B,) each row's last real token
    tol = tolerance(dtype, 3, accumulation=T + 70 + m.config.ffn_size)
    assert rel_err(r.logits, logits[torch.arange(3), last]) < tol
    _check_state(r.state, ref_state, tol)
