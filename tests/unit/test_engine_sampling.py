"""Engine: batch sampling tensors are concatenated from per-request rows built once at submit."""

from __future__ import annotations

import pytest
import torch

from model.sampling import SamplingParams, SamplingTensors
from server.engine.sampling_rows import BatchSampling, concat_rows

V = 50

PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7, top_k=5, seed=1),
    SamplingParams(temperature=1.2, top_p=0.8, min_p=0.05, seed=2, logit_bias={3: 2.0, 7: -1.0}),
    SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5, seed=3),
    SamplingParams(temperature=1.0, frequency_penalty=0.4, logit_bias={3: 1.0}, seed=4),
]


def fields(st: SamplingTensors) -> dict:
    out = {}
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition", "presence", "frequency"):
        out[name] = getattr(st, name)
    out["bias"] = st.logit_bias
    return out


@pytest.mark.parametrize("rows", [[0], [0, 1], [1, 2, 3, 4], [0, 1, 2, 3, 4], [4, 2], [0, 0, 3]])
def test_concatenated_rows_equal_the_batch_built_at_once(rows):
    params = [PARAMS[i] for i in rows]
    gens = [p.make_generator() for p in params]
    whole = SamplingTensors.from_params(params, V, generators=gens)
    singles = [SamplingTensors.from_params([p], V, generators=[g]) for p, g in zip(params, gens, strict=True)]
    parts = concat_rows(singles)
    a, b = fields(whole), fields(parts)
    for name, x in a.items():
        y = b[name]
        assert (x is None) == (y is None), name
        if x is not None and name != "bias":
            assert torch.equal(x, y), name
    if a["bias"] is not None:
        for x, y in zip(a["bias"], b["bias"], strict=True):
            assert torch.equal(x, y)
    assert parts.generators == gens and parts.all_greedy == whole.all_greedy


def test_sampling_from_concatenated_rows_draws_the_same_tokens():
    torch.manual_seed(0)
    logits = torch.randn(len(PARAMS), V)  # (B, V)
    counts = torch.randint(0, 3, (len(PARAMS), V))  # (B, V)
    whole = SamplingTensors.from_params(PARAMS, V)
    parts = concat_rows([SamplingTensors.from_params([p], V) for p in PARAMS])
    for _ in range(5):
        assert torch.equal(whole.sample(logits, counts), parts.sample(logits, counts))


def test_batch_sampling_rebuilds_only_when_the_rows_change():
    rows = [SamplingTensors.from_params([p], V) for p in PARAMS]
    cache = BatchSampling()
    first = cache.for_rows(rows[:3])
    assert cache.for_rows(list(rows[:3])) is first  # same rows: no rebuild
    other = cache.for_rows(rows[1:4])
    assert other is not first and other.batch_size == 3
    assert torch.equal(other.temperature, torch.tensor([0.7, 1.2, 0.9]))
