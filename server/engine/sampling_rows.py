"""Sampling tensors of a batch, concatenated from the per-request rows built (and validated) at submit.

A batch change only concatenates small per-row tensors: no parameter is validated or converted again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from model.sampling import LogitBias, SamplingTensors

# optional per-row fields and their "off" value (a row whose field is None behaves as this value)
_OPTIONAL_OFF: dict[str, float] = {
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition": 1.0,
    "presence": 0.0,
    "frequency": 0.0,
}


def _concat_field(rows: Sequence[SamplingTensors], name: str) -> Tensor | None:
    values: list[Tensor | None] = [getattr(r, name) for r in rows]
    present = next((v for v in values if v is not None), None)
    if present is None:
        return None  # no row uses it: the work is skipped, as `SamplingTensors.from_params` does
    off = _OPTIONAL_OFF[name]
    filled = [v if v is not None else torch.full_like(present[:1], off) for v in values]
    return torch.cat(filled)  # (B,)


def _concat_bias(rows: Sequence[SamplingTensors]) -> LogitBias | None:
    parts = [(i, r.logit_bias) for i, r in enumerate(rows) if r.logit_bias is not None]
    if not parts:
        return None
    return LogitBias(
        torch.cat([torch.full_like(b.rows, i) for i, b in parts]),  # (N,) row index in the batch
        torch.cat([b.token_ids for _, b in parts]),
        torch.cat([b.values for _, b in parts]),
    )


def concat_rows(rows: Sequence[SamplingTensors]) -> SamplingTensors:
    """One batch from single-row `SamplingTensors` (in row order); generators are kept, not copied."""
    assert rows and all(r.batch_size == 1 for r in rows), "concat_rows takes single-row tensors"
    if len(rows) == 1:
        return rows[0]
    return SamplingTensors(
        temperature=torch.cat([r.temperature for r in rows]),  # (B,)
        top_k=_concat_field(rows, "top_k"),
        top_p=_concat_field(rows, "top_p"),
        min_p=_concat_field(rows, "min_p"),
        repetition=_concat_field(rows, "repetition"),
        presence=_concat_field(rows, "presence"),
        frequency=_concat_field(rows, "frequency"),
        logit_bias=_concat_bias(rows),
        generators=[g for r in rows for g in r.generators],
        all_greedy=all(r.all_greedy for r in rows),
    )


class BatchSampling:
    """The sampling tensors of the rows sampled last, rebuilt only when that set of rows changes."""

    def __init__(self) -> None:
        self._rows: list[SamplingTensors] = []  # held, so that their ids cannot be reused meanwhile
        self._tensors: SamplingTensors | None = None

    def for_rows(self, rows: Sequence[SamplingTensors]) -> SamplingTensors:
        same = len(rows) == len(self._rows) and all(a is b for a, b in zip(rows, self._rows, strict=True))
        if self._tensors is None or not same:
            self._tensors = concat_rows(rows)
            self._rows = list(rows)
        return self._tensors
