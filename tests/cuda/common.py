"""Shared pieces of the device tests: the devices and dtypes they run over, the tolerance bound, and a
float64 reference built from exactly the weights the device model holds.

Every check runs on "cpu" always and on "cuda" when a CUDA device exists (the only allowed skip: CI has
no GPU). Checks compare a model in `dtype` on `device` with a float64 CPU copy of the *same* (already
rounded) weights, so what is measured is the rounding of activations only, and the bound below is the
error analysis of that rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch

from model.retnet import RetNet
from tests.support import models

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")

# The cpu variant runs everywhere; the cuda one is marked `cuda` (select it with `pytest -m cuda`).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NO_CUDA])]

# Unit roundoff u of each dtype: round-to-nearest with p significand bits gives |rel. error| <= 2^-p.
# bfloat16: 8 bits (7 stored + the implicit one) -> 2^-8 ~ 3.9e-3; float32: 24 bits -> 2^-24 ~ 6e-8.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}

# Roundings to the model's dtype along the deepest path through one block (model/layers.py): the
# attention norm's output, the q/k/v/g projections, the retention output cast back before o_proj,
# o_proj, the residual add, the MLP norm, gate/up, silu(gate) and its product with up, down, the
# second residual add -> at most 10 in sequence per layer (+2: final norm and lm_head).
ROUNDINGS_PER_LAYER = 10


def tolerance(dtype: torch.dtype, num_layers: int, accumulation: int) -> float:
    """Worst-case relative error bound gamma_n = n*u / (1 - n*u) (Higham, first order) for a model of
    `num_layers` blocks in `dtype`, against float64 with the same weights (max |a - b| / max |b|).

    n counts the sequential roundings in `dtype` (ROUNDINGS_PER_LAYER * layers + 2) plus the float32
    accumulation depth (`accumulation`: the longest sum, e.g. a retention sum over T tokens or a dot
    product over the FFN width), which in float32 costs one 2^-24 per term. For bfloat16 the matmuls and
    the retention accumulate in float32 (states are float32), so the accumulation term is 2^-24 per term
    and the bound is dominated by the bf16 roundings: 22 * 2^-8 ~ 0.086 for 2 layers. Random-walk
    accumulation would give ~sqrt(n) * u (0.018 for 2 layers); the worst case is the bound we hold to,
    so a pass means no error beyond what the rounding itself can explain. (cuBLAS may reduce bf16 GEMMs
    partly in bf16 when split-K is used; on the test model's K <= 64 that is not expected, and measured
    errors sit ~10x under the bound: 0.008 for bf16 logits on the CPU.)
    """
    u = UNIT_ROUNDOFF[dtype]
    n_rounds = ROUNDINGS_PER_LAYER * num_layers + 2
    eps = n_rounds * u + accumulation * 2.0**-24
    assert eps < 0.5, eps  # the first-order bound is meaningful only for n*u well below 1
    return eps / (1 - eps)


def random_model(device: str, dtype: torch.dtype, **overrides) -> tuple[RetNet, RetNet]:
    """(the model on `device` in `dtype`, a float64 CPU copy of exactly its weights).

    Norm weights are non-trivial so that a wrong norm would show (tests/support/models.py)."""
    base = models.random_model(torch.float32, **overrides)
    dev = copy.deepcopy(base).to(device=device, dtype=dtype)
    ref = copy.deepcopy(dev).to(device="cpu", dtype=torch.float64)  # the rounded weights, exactly
    return dev, ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
