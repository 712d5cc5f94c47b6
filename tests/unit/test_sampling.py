"""Batched sampling math (model/sampling.py) and the generate() helper on a tiny random RetNet."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from model.config import preset
from model.retnet import RetNet
from model.sampling import (
    LogitBias,
    SamplingParams,
    SamplingTensors,
    add_tokens,
    apply_logit_bias,
    apply_penalties,
    apply_temperature_topk_topp_minp,
    count_tokens,
    draw_uniforms,
    generate,
    logprobs,
    sample,
)
from model.state import RetentionState


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These tests run thousands of tiny ops: one intra-op thread keeps them fast on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _logits(B: int, V: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale  # (B, V)


def _gens(seeds: list[int | None]) -> list[torch.Generator | None]:
    return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]


def _full(B: int, value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full((B,), value, dtype=dtype)


# ---- greedy / filters ---------------------------------------------------------------------------
def test_greedy_is_argmax() -> None:
    x = _logits(16, 97)
    temp = torch.tensor([0.0] * 8 + [1.0] * 8)
    out = sample(
        x,
        temp,
        top_k=torch.tensor([0, 3, 0, 5] * 4),
        top_p=_full(16, 0.9),
        min_p=_full(16, 0.05),
        generators=_gens(list(range(16))),
    )
    assert out.dtype == torch.long and out.shape == (16,)
    assert torch.equal(out[:8], x[:8].argmax(-1))
    # The sampled rows are not all argmax (the test above could not pass by always returning argmax).
    many = sample(x.repeat(8, 1), _full(128, 1.0), generators=_gens(list(range(128))))
    assert not torch.equal(many, x.repeat(8, 1).argmax(-1))


def test_top_k_1_is_greedy() -> None:
    x = _logits(64, 200, seed=1)
    out = sample(x, _full(64, 1.5), top_k=torch.ones(64, dtype=torch.long), generators=_gens(list(range(64))))
    assert torch.equal(out, x.argmax(-1))


def test_top_k_keeps_the_k_highest() -> None:
    x = _logits(4, 30, seed=2)
    k = torch.tensor([0, 1, 5, 100])
    out = apply_temperature_topk_topp_minp(x, None, top_k=k)
    finite = torch.isfinite(out)
    assert finite.sum(-1).tolist() == [30, 1, 5, 30]
    top5 = x[2].topk(5).indices
    assert set(finite[2].nonzero().flatten().tolist()) == set(top5.tolist())
    assert torch.equal(out[finite], x[finite])  # kept logits unchanged


def test_tiny_top_p_keeps_only_top_token() -> None:
    x = _logits(32, 50, seed=3)
    out = apply_temperature_topk_topp_minp(x, _full(32, 1.0), top_p=_full(32, 1e-6))
    finite = torch.isfinite(out)
    assert finite.sum(-1).eq(1).all()
    assert torch.equal(finite.float().argmax(-1), x.argmax(-1))
    toks = sample(x, _full(32, 1.0), top_p=_full(32, 1e-6), generators=_gens(list(range(32))))
    assert torch.equal(toks, x.argmax(-1))


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    probs = torch.tensor([0.15, 0.05, 0.5, 0.3])
    x = probs.log().repeat(4, 1)  # (4, 4)
    out = apply_temperature_topk_topp_minp(x, None, top_p=torch.tensor([0.4, 0.7, 0.85, 1.0]))
    keep = torch.isfinite(out)
    assert keep.tolist() == [
        [False, False, True, False],
        [False, False, True, True],
        [True, False, True, True],
        [True, True, True, True],
    ]
    # top_p = 1 is exactly "off", even where float32 mass reaches 1.0 before the tail
    peaked = torch.tensor([[0.0, -30.0, -30.0, -40.0]])
    assert torch.isfinite(apply_temperature_topk_topp_minp(peaked, None, top_p=torch.tensor([1.0]))).all()


def test_min_p_filters_relative_to_top_probability() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    x = probs.log().repeat(4, 1)
    out = apply_temperature_topk_topp_minp(x, None, min_p=torch.tensor([0.0, 0.2, 0.5, 1.0]))
    assert torch.isfinite(out).tolist() == [
        [True, True, True, True],
        [True, True, True, False],  # threshold 0.1
        [True, True, False, False],  # threshold 0.25
        [True, False, False, False],  # only the top token reaches 1.0 * max
    ]


def test_temperature_scaling() -> None:
    x = _logits(3, 10, seed=4)
    out = apply_temperature_topk_topp_minp(x, torch.tensor([2.0, 0.5, 0.0]))
    torch.testing.assert_close(out[0], x[0] / 2.0, rtol=0, atol=0)
    torch.testing.assert_close(out[1], x[1] / 0.5, rtol=0, atol=0)
    torch.testing.assert_close(out[2], x[2], rtol=0, atol=0)  # greedy rows are left for sample()
    # higher temperature flattens the distribution
    p_hot, p_cold = torch.softmax(out[0], -1), torch.softmax(out[1], -1)
    assert p_hot.max() < torch.softmax(x[0], -1).max() < p_cold.max()


# ---- penalties and bias -------------------------------------------------------------------------
def test_penalties_exact_values() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[1, 2, 0, 0], [1, 2, 0, 0]])
    out = apply_penalties(
        logits,
        counts,
        repetition=torch.tensor([2.0, 1.0]),
        presence=torch.tensor([0.5, 0.0]),
        frequency=torch.tensor([0.25, 0.0]),
    )
    # row 0: repetition 2 -> [1.0, -2.0, 0.5, 3.0]; then -0.5 * seen - 0.25 * count
    expected0 = torch.tensor([1.0 - 0.5 - 0.25, -2.0 - 0.5 - 0.5, 0.5, 3.0])
    torch.testing.assert_close(out[0], expected0, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], logits[1], rtol=0, atol=0)  # neutral parameters
    # each penalty on its own
    only_freq = apply_penalties(logits[:1], counts[:1], frequency=torch.tensor([1.0]))
    torch.testing.assert_close(only_freq[0], torch.tensor([1.0, -3.0, 0.5, 3.0]), rtol=0, atol=1e-6)
    only_pres = apply_penalties(logits[:1], counts[:1], presence=torch.tensor([-1.0]))
    torch.testing.assert_close(only_pres[0], torch.tensor([3.0, 0.0, 0.5, 3.0]), rtol=0, atol=1e-6)
    only_rep = apply_penalties(logits[:1], counts[:1], repetition=torch.tensor([0.5]))
    torch.testing.assert_close(only_rep[0], torch.tensor([4.0, -0.5, 0.5, 3.0]), rtol=0, atol=1e-6)
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0]] * 2))  # input not modified


def test_count_tokens_and_add_tokens() -> None:
    counts = count_tokens([[1, 1, 3], [], torch.tensor([0])], vocab_size=5)
    assert counts.tolist() == [[0, 2, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    add_tokens(counts, torch.tensor([3, 4, 0]))
    assert counts.tolist() == [[0, 2, 0, 2, 0], [0, 0, 0, 0, 1], [2, 0, 0, 0, 0]]


def test_logit_bias_dense_and_sparse() -> None:
    x = _logits(3, 6, seed=5)
    bias = LogitBias.from_dicts([{1: 5.0, 4: -100.0}, None, {0: 0.5}])
    assert bias is not None
    out = apply_logit_bias(x, bias)
    dense = torch.zeros(3, 6)
    dense[0, 1], dense[0, 4], dense[2, 0] = 5.0, -100.0, 0.5
    torch.testing.assert_close(out, x + dense, rtol=0, atol=0)
    torch.testing.assert_close(apply_logit_bias(x, dense), x + dense, rtol=0, atol=0)
    assert LogitBias.from_dicts([None, {}]) is None
    assert apply_logit_bias(x, None) is x
    # a strong bias decides greedy decoding
    st = SamplingTensors.from_params([SamplingParams(temperature=0, logit_bias={2: 100.0})], 6)
    assert st.sample(x[:1]).tolist() == [2]


# ---- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"seed": -1}, "seed"),
        ({"logit_bias": {512: 1.0}}, "token id 512"),
        ({"logit_bias": {-1: 1.0}}, "token id -1"),
        ({"logit_bias": {3: 101.0}}, "logit_bias for token 3"),
    ],
)
def test_validation_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs).validate(512)
    with pytest.raises(ValueError, match=match):
        SamplingTensors.from_params([SamplingParams(), SamplingParams(**kwargs)], 512)


def test_valid_params_pass() -> None:
    SamplingParams().validate(512)
    SamplingParams(
        temperature=0.0,
        top_k=40,
        top_p=1.0,
        min_p=1.0,
        repetition_penalty=1.3,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        seed=2**64 - 1,
        logit_bias={0: -100.0, 511: 100},
    ).validate(512)


# ---- reproducibility and distribution -----------------------------------------------------------
def test_seeded_row_is_independent_of_batch_composition() -> None:
    V, steps = 40, 300
    target = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, min_p=0.01, seed=1234)
    others = [
        SamplingParams(temperature=1.5, seed=7),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_p=0.5),  # unseeded: global generator
        SamplingParams(temperature=0.7, top_k=3, seed=99),
    ]
    layouts = [[target], [target, *others], [*others[:2], target, *others[2:]], [*others, target]]
    runs = []
    for layout in layouts:
        torch.manual_seed(len(layout))  # the unseeded rows' draws differ between layouts
        st = SamplingTensors.from_params(layout, V)
        row = layout.index(target)
        data = torch.Generator().manual_seed(0)  # the same target logits at every step in every layout
        toks = []
        for step in range(steps):
            x = torch.randn(len(layout), V, generator=torch.Generator().manual_seed(len(layout) + step)) * 2
            x[row] = torch.randn(V, generator=data) * 2
            toks.append(int(st.sample(x)[row]))
        runs.append(toks)
    assert all(r == runs[0] for r in runs[1:])
    assert len(set(runs[0])) > 5  # really sampled, not constant
    # A different seed gives a different sequence (the check above has power).
    st = SamplingTensors.from_params([SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=4321)], V)
    data = torch.Generator().manual_seed(0)
    other = [int(st.sample((torch.randn(V, generator=data) * 2)[None])[0]) for _ in range(steps)]
    assert other != runs[0]


def test_each_row_uses_its_own_generator() -> None:
    gens = _gens([5, None, 6])
    u = draw_uniforms(gens, "cpu")
    assert u.dtype == torch.float64 and u.shape == (3,)
    assert (
        u[0].item() == torch.rand(1, generator=torch.Generator().manual_seed(5), dtype=torch.float64).item()
    )
    assert (
        u[2].item() == torch.rand(1, generator=torch.Generator().manual_seed(6), dtype=torch.float64).item()
    )


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs.double() * n
    return float(((counts.double() - expected) ** 2 / expected).sum())


def test_distribution_matches_softmax() -> None:
    V, n, temp = 8, 20_000, 1.3
    x = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -1.0, 1.5, 0.3]])
    gen = [torch.Generator().manual_seed(2024)]
    t = torch.tensor([temp])
    counts = torch.zeros(V, dtype=torch.long)
    for _ in range(n):
        counts[sample(x, t, generators=gen)] += 1
    probs = torch.softmax(x[0] / temp, -1)
    # chi-square with 7 degrees of freedom: P(chi2 > 29.9) ~ 1e-4
    assert _chi2(counts, probs) < 29.9
    assert _chi2(counts, torch.softmax(x[0], -1)) > 100  # the wrong temperature is detected


def test_filtered_distribution_matches_renormalised_softmax() -> None:
    V, n = 10, 20_000
    x = _logits(1, V, seed=6, scale=1.0).repeat(n, 1)  # one row's logits, n independent seeded draws
    top_k = torch.full((n,), 4, dtype=torch.long)
    toks = sample(x, _full(n, 1.0), top_k=top_k, generators=_gens(list(range(n))))
    counts = torch.bincount(toks, minlength=V)
    top4 = x[0].topk(4).indices
    assert counts.sum() == counts[top4].sum()  # nothing outside the top 4
    probs = torch.softmax(x[0, top4], -1)
    assert _chi2(counts[top4], probs) < 21.1  # 3 dof, P ~ 1e-4


# ---- SamplingTensors and logprobs ---------------------------------------------------------------
def test_sampling_tensors_pipeline() -> None:
    V = 12
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(temperature=0.8, top_k=5, min_p=0.1, frequency_penalty=0.3, logit_bias={3: 2.0}),
        SamplingParams(temperature=1.2, top_p=0.9, presence_penalty=-0.4, seed=3),
    ]
    st = SamplingTensors.from_params(params, V)
    assert st.batch_size == 3 and st.needs_counts and not st.all_greedy
    assert st.top_k is not None and st.top_k.tolist() == [0, 5, 0]
    x = _logits(3, V, seed=7)
    counts = count_tokens([[1, 2, 2], [3, 3, 4], [5]], V)
    with pytest.raises(ValueError, match="token_counts"):
        st.process(x)
    manual = apply_penalties(x, counts, st.repetition, st.presence, st.frequency)
    manual = apply_logit_bias(manual, st.logit_bias)
    manual = apply_temperature_topk_topp_minp(manual, st.temperature, st.top_k, st.top_p, st.min_p)
    torch.testing.assert_close(st.process(x, counts), manual, rtol=0, atol=0)
    assert st.sample(x, counts)[0] == apply_penalties(x, counts, st.repetition)[0].argmax()

    plain = SamplingTensors.from_params([SamplingParams(), SamplingParams(temperature=0)], V)
    for name in ("top_k", "top_p", "min_p", "repetition", "presence", "frequency", "logit_bias"):
        assert getattr(plain, name) is None, name
    assert not plain.needs_counts
    torch.testing.assert_close(plain.process(x[:2]), x[:2], rtol=0, atol=0)
    assert SamplingTensors.from_params([SamplingParams(temperature=0)] * 2, V).all_greedy


def test_logprobs() -> None:
    x = _logits(5, 30, seed=8)
    chosen = torch.tensor([0, 3, 29, 7, 7])
    lp, ids, top = logprobs(x, chosen, top_n=4)
    ref = torch.log_softmax(x, -1)
    assert lp.shape == (5,) and ids.shape == (5, 4) and top.shape == (5, 4)
    torch.testing.assert_close(lp, ref[torch.arange(5), chosen])
    torch.testing.assert_close(top, ref.topk(4, -1).values)
    assert torch.equal(ids, ref.topk(4, -1).indices)
    torch.testing.assert_close(top, ref.gather(1, ids))
    _, ids0, top0 = logprobs(x, chosen, top_n=0)
    assert ids0.shape == (5, 0) and top0.shape == (5, 0)
    with pytest.raises(ValueError):
        logprobs(x, chosen, top_n=-1)


# ---- generate() on a tiny random model ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> RetNet:
    torch.manual_seed(0)
    return RetNet(preset("tiny")).eval()


PROMPT = [5, 17, 300, 42, 8, 99]


def _assert_same_state(a: RetentionState, b: RetentionState) -> None:
    assert torch.equal(a.position, b.position)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert torch.allclose(x, y, atol=1e-5), (x - y).abs().max()


def test_generate_is_deterministic_given_seed(tiny: RetNet) -> None:
    p = SamplingParams(temperature=1.0, top_k=50, repetition_penalty=1.2, seed=11)
    a, _ = generate(tiny, PROMPT, 20, p)
    torch.manual_seed(123)  # the global generator must not matter for a seeded request
    b, _ = generate(tiny, torch.tensor(PROMPT), 20, p)
    c, _ = generate(
        tiny, PROMPT, 20, SamplingParams(temperature=1.0, top_k=50, repetition_penalty=1.2, seed=12)
    )
    assert len(a) == 20 and a == b
    assert a != c


def test_greedy_generate_matches_full_reforwards(tiny: RetNet) -> None:
    n = 12
    out, state = generate(tiny, PROMPT, n, SamplingParams(temperature=0.0))
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = tiny(torch.tensor([seq]), mode="parallel")
            seq.append(int(logits[0, -1].argmax()))
        _, full_state = tiny(torch.tensor([seq]), mode="parallel")
    assert out == seq[len(PROMPT) :]
    assert len(set(out)) > 1
    assert state.position.tolist() == [len(PROMPT) + n]
    _assert_same_state(state, full_state)


def test_generate_final_state_absorbs_prompt_and_returned_tokens(tiny: RetNet) -> None:
    out, state = generate(tiny, PROMPT, 9, SamplingParams(temperature=0.8, presence_penalty=0.5, seed=3))
    with torch.no_grad():
        _, ref = tiny(torch.tensor([PROMPT + out]))
    _assert_same_state(state, ref)

    none, state0 = generate(tiny, PROMPT, 0, SamplingParams(seed=3))
    with torch.no_grad():
        _, ref0 = tiny(torch.tensor([PROMPT]))
    assert none == []
    _assert_same_state(state0, ref0)


def test_generate_penalties_count_prompt_and_generated_tokens(tiny: RetNet) -> None:
    # Biases favour 42 (in the prompt) and then 7 (not in it); the presence penalty (-2) outweighs
    # both biases once a token has been seen, in the prompt or in the output.
    params = SamplingParams(
        temperature=0.0, presence_penalty=2.0, frequency_penalty=0.1, logit_bias={42: 1.0, 7: 0.5}
    )
    n = 10
    out, _ = generate(tiny, PROMPT, n, params)
    assert out[0] == 7 and 7 not in out[1:] and 42 not in out
    st = SamplingTensors.from_params([params], tiny.config.vocab_size)
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = tiny(torch.tensor([seq]), mode="parallel")
            counts = count_tokens([seq], tiny.config.vocab_size)
            seq.append(int(st.sample(logits[:, -1], counts)[0]))
    assert out == seq[len(PROMPT) :]


def test_generate_continues_from_a_state(tiny: RetNet) -> None:
    greedy = SamplingParams(temperature=0.0)
    first, state = generate(tiny, PROMPT[:3], 4, greedy)
    second, state2 = generate(tiny, PROMPT[3:], 5, greedy, state=state)
    whole, ref = generate(tiny, PROMPT[:3] + first + PROMPT[3:], 5, greedy)
    assert second == whole
    _assert_same_state(state2, ref)


def test_generate_stops_at_stop_ids_and_eos(tiny: RetNet) -> None:
    greedy = SamplingParams(temperature=0.0)
    full, _ = generate(tiny, PROMPT, 10, greedy)
    stop = full[4]
    cut = full.index(stop) + 1
    out, state = generate(tiny, PROMPT, 10, greedy, stop_token_ids={stop})
    assert out == full[:cut]  # the stop token is returned and absorbed
    assert state.position.tolist() == [len(PROMPT) + cut]

    torch.manual_seed(0)
    with_eos = RetNet(preset("tiny", eos_token_id=stop)).eval()
    out_eos, _ = generate(with_eos, PROMPT, 10, greedy)
    assert out_eos == full[:cut]


def test_generate_rejects_bad_input(tiny: RetNet) -> None:
    with pytest.raises(ValueError, match="prompt token"):
        generate(tiny, [], 3)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(tiny, [1, 512], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(tiny, PROMPT, 3, SamplingParams(temperature=-1))
