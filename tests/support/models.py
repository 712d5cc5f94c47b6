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


def random_ids(B: int, T: int, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    """(B, T) int64 token ids below `vocab`, from their own seeded generator (the global RNG untouched)."""
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))
