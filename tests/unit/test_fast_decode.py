"""The fast decode step (model.fast.FastDecoder, server.engine.decode.DecodeStep) equals the reference
forms: fp64 within 1e-10, fp32 within 1e-5 (relative); ragged rows, resumed states, keep masks, GQA."""

from __future__ import annotations

import pytest
import torch

from model.fast import FastDecoder
from model.ops import naive_retention
from model.retnet import RetNet
from model.state import RetentionState, StateMismatchError
from server.engine.decode import DecodeStep
from tests.support.models import random_ids, random_model

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def _ragged_state(model: RetNet, keep: bool = False) -> RetentionState:
    """Four rows at different positions (left-padded prompts of 9, 4, 1 and 0 tokens), some tokens dropped."""
    lengths = [9, 4, 1, 0]
    mask = torch.tensor([[0] * (9 - n) + [1] * n for n in lengths])
    keep_mask = random_ids(4, 9, seed=5) % 3 != 0 if keep else None
    with torch.inference_mode():
        _, state = model(random_ids(4, 9, seed=1), attention_mask=mask, keep=keep_mask)
    return state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kv_heads", [None, 1])  # MHA and GQA
@pytest.mark.parametrize("keep", [False, True])
@torch.inference_mode()
def test_fast_steps_equal_the_three_forms(dtype: torch.dtype, kv_heads: int | None, keep: bool) -> None:
    """Six fast steps from ragged resumed states == the model reading those tokens in each form."""
    model = random_model(dtype, num_kv_heads=kv_heads)
    dec = FastDecoder(model)
    start = _ragged_state(model, keep)
    steps = random_ids(4, 6, seed=2)
    state = start.clone()
    logits = torch.stack([dec.step(steps[:, t], state.layers, state.position) for t in range(6)], 1)
    for mode, cs in [("recurrent", 64), ("parallel", 64), ("chunk", 4), ("chunk", 64)]:
        ref_logits, ref = model(steps, start.clone(), mode=mode, chunk_size=cs)
        assert _rel(logits, ref_logits) < TOL[dtype], mode
        assert torch.equal(state.position, ref.position)
        for a, b in zip(state.layers, ref.layers, strict=True):
            assert _rel(a, b) < TOL[dtype], mode


@torch.inference_mode()
def test_fast_step_retention_equals_the_naive_reference() -> None:
    """A one-layer model's state after fast steps equals naive_retention over its rotated q, k, v."""
    model = random_model(torch.float64, num_hidden_layers=1)
    attn, norm = model.model.layers[0].attn, model.model.layers[0].attn_norm
    ids = random_ids(2, 5, seed=3)
    state = model.empty_state(2)
    state.position += torch.tensor([0, 1000])  # rows far apart
    start = state.position.clone()
    dec = FastDecoder(model)
    for t in range(5):
        dec.step(ids[:, t], state.layers, state.position)
    x = norm(model.model.embeddings(ids))
    B, T = ids.shape
    rope = model.rotary(start[:, None] + torch.arange(T), x.dtype)
    q = rope.rotate(attn.q_proj(x).view(B, T, 2, -1)).transpose(1, 2)
    k, v = attn.project_kv(x)
    _, final = naive_retention(q, rope.rotate(k).transpose(1, 2), v.transpose(1, 2))
    assert _rel(state.layers[0], final) < 1e-10


@torch.inference_mode()
def test_batched_decode_equals_rows_alone() -> None:
    """Eager DecodeStep: every row of a batch gets what it gets alone, to float rounding (the matmuls of
    one row and of four are different BLAS kernels, as in the reference forward)."""
    model = random_model(torch.float32)
    step = DecodeStep(model)
    batch = _ragged_state(model, keep=True)
    alone = batch.split()
    toks = random_ids(4, 5, seed=4)
    for t in range(5):
        logits, batch = step(toks[:, t : t + 1], batch)
        for i, row in enumerate(alone):
            row_logits, alone[i] = step(toks[i : i + 1, t : t + 1], row)
            assert _rel(row_logits[0], logits[i]) < 1e-6
    for i, row in enumerate(alone):
        assert torch.equal(batch.position[i : i + 1], row.position)
        for a, b in zip(batch.select([i]).layers, row.layers, strict=True):
            assert _rel(a, b) < 1e-6


def test_decode_step_validates_a_new_batch() -> None:
    model = random_model(torch.float32)
    step = DecodeStep(model)
    with pytest.raises(ValueError, match="tokens must be"):
        step(torch.zeros(3, 1, dtype=torch.long), model.empty_state(2))
    with pytest.raises(ValueError, match="state must be"):
        step(torch.zeros(2, 1, dtype=torch.long), model.empty_state(2).to(dtype=torch.float64))
    other = random_model(torch.float32, hidden_size=64)
    with pytest.raises(StateMismatchError):
        step(torch.zeros(2, 1, dtype=torch.long), other.empty_state(2))


def test_shared_decoder_is_rebuilt_when_the_weights_change() -> None:
    model = random_model(torch.float32)
    dec = FastDecoder.shared(model)
    assert FastDecoder.shared(model) is dec
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    fresh = FastDecoder.shared(model)
    assert fresh is not dec and torch.equal(fresh.lm_head, model.lm_head.weight)
    assert FastDecoder.shared(model.double()).embed.dtype == torch.float64


@torch.inference_mode()
def test_the_decoder_holds_no_second_copy_of_the_weights() -> None:
    """The fused matrices are the only copy: the model's q/k/v/g and gate/up weights are views into
    them, the model's forward is unchanged, and asking again does not rebuild."""
    model = random_model(torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.inference_mode():
        before, _ = model(ids)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dec = FastDecoder.shared(model)
    assert FastDecoder.shared(model) is dec
    storages = {}
    for t in [*model.parameters(), *dec.buffers()]:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    extra = sum(storages.values()) - param_bytes
    # only the norms cast to the compute dtype and the rotary/decay tables are the decoder's own
    own = sum(b.numel() * b.element_size() for n, b in dec.named_buffers() if "norm" in n)
    assert extra <= own + 4096, (extra, own)
    attn = model.model.layers[0].attn
    fused = dec.layers[0].qkvg
    assert attn.q_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    with torch.inference_mode():
        after, _ = model(ids)
    assert torch.equal(before, after)


def test_bfloat16_fast_step_matches_the_reference() -> None:
    """A bf16 model (what the engine runs on CUDA): the same dtypes as the forward, fp32 state."""
    model = random_model(torch.bfloat16)
    start = _ragged_state(model)
    state = start.clone()
    toks = random_ids(4, 1, seed=6)
    logits = FastDecoder(model).step(toks[:, 0], state.layers, state.position)
    ref_logits, ref = model(toks, start.clone(), mode="recurrent")
    assert logits.dtype == torch.bfloat16 and state.layers[0].dtype == torch.float32
    assert _rel(logits, ref_logits[:, 0]) < 2e-2
    for a, b in zip(state.layers, ref.layers, strict=True):
        assert _rel(a, b) < 1e-2


@pytest.mark.slow  # compiles one bucket (~10-20 s here)
@torch.inference_mode()
def test_compiled_bucket_with_padding_matches_eager() -> None:
    model = random_model(torch.float32)
    compiled = DecodeStep(model, compile=True, buckets=(4,), select_by_timing=False)
    compiled.warmup()
    other = DecodeStep(model, True, (4,))  # another engine's step: the same graphs, its own buffers
    assert other._fn is compiled._fn and other._buffers[4] is not compiled._buffers[4]
    eager = DecodeStep(model)
    start = _ragged_state(model)
    for rows in ([0, 1, 2], [0, 1, 2, 3]):  # padded to the bucket, and a full bucket
        a, b = start.select(rows), start.select(rows)
        toks = random_ids(len(rows), 4, seed=7)
        for t in range(4):
            la, a = compiled(toks[:, t : t + 1], a)
            lb, b = eager(toks[:, t : t + 1], b)
            assert _rel(la, lb) < 1e-5
        assert torch.equal(a.position, b.position)
        for x, y in zip(a.layers, b.layers, strict=True):
            assert _rel(x, y) < 1e-5
