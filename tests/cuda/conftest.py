"""tests/cuda: float32 matmuls at full precision (no TF32) for every test here, whatever ran before."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _full_precision_float32_matmuls() -> Iterator[None]:
    # TF32 (10 significant bits) would break the float32 bounds of common.py; torch's default is "highest",
    # this pins it in case anything in the same process changed it.
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)
