"""Random-weight models for the model-core tests."""

from __future__ import annotations

import torch

from model.config import preset
from model.retnet import RetNet


def random_model(dtype: torch.dtype = torch.float32, *, seed: int = 0, **overrides) -> RetNet:
    """A `tiny`-preset RetNet (config `overrides`) in `dtype`, seeded, with non-trivial norm weights
    (1 + 0.3·N(0, 1), drawn in `dtype`) so that a wrong norm would show."""
    torch.manual_seed(seed)
    m = RetNet(preset("tiny", **overrides)).eval().to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m
