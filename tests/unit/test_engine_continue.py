"""Engine: the final output's next-token logits, and continuing from (state, logits) without new input."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine import Engine, EngineConfig, EngineRequest, EngineSamplingParams
from tests.support.engine import TEXT, abort_after, model, prefix_state, run, tok


def greedy(n: int, **kw) -> EngineSamplingParams:
    return EngineSamplingParams(temperature=0, max_tokens=n, **kw)


def reference_logits(ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model()(torch.tensor([ids]))[0][0, -1]  # (V,)


PROMPT = tok().encode(TEXT)[:37]


def test_read_only_request_returns_its_state_and_next_token_logits():
    ((ids, _, out),) = run([EngineRequest(list(PROMPT), greedy(0))])
    assert ids == [] and out.finish_reason == "length"
    assert out.logits is not None and out.logits.dtype == torch.float32 and out.logits.device.type == "cpu"
    assert out.logits.shape == (tok().vocab_size,)
    torch.testing.assert_close(out.logits, reference_logits(PROMPT), atol=1e-4, rtol=1e-4)
    assert int(out.state.position[0]) == len(PROMPT)


@pytest.mark.parametrize("n", [1, 7])
def test_continue_from_primed_state_equals_reading_the_prompt(n):
    ((_, _, primed),) = run([EngineRequest(list(PROMPT), greedy(0))])
    ((cont_ids, cont_text, cont),) = run([EngineRequest([], greedy(n), primed.state, logits=primed.logits)])
    ((ref_ids, ref_text, ref),) = run([EngineRequest(list(PROMPT), greedy(n))])
    assert cont_ids == ref_ids and len(ref_ids) == n and cont_text == ref_text
    assert cont.usage.prompt_tokens == 0 and cont.usage.completion_tokens == n
    torch.testing.assert_close(cont.state.layers[-1], ref.state.layers[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cont.logits, ref.logits, atol=1e-4, rtol=1e-4)
    assert primed.state.batch_size == 1 and int(primed.state.position[0]) == len(PROMPT)  # not changed


FINISHES = {
    "length": greedy(6),
    "stop_token": greedy(20, stop_token_ids=[74]),  # (74 is the 5th greedy token of PROMPT)
    "eos": greedy(20, min_tokens=3, logit_bias={tok().eos_id: 100.0}),
    "stop": greedy(30, stop=["er", "zzq"]),  # a stop string: the final state is a snapshot
}


@pytest.mark.parametrize("reason", list(FINISHES))
def test_final_logits_belong_to_the_final_state(reason):
    """Chaining: generate, then continue from the final (state, logits) == one longer generation."""
    ((ids, _, out),) = run([EngineRequest(list(PROMPT), FINISHES[reason])])
    assert out.finish_reason == reason and out.usage.completion_tokens == len(ids)
    torch.testing.assert_close(out.logits, reference_logits(PROMPT + ids), atol=1e-4, rtol=1e-4)
    ((more, _, _),) = run([EngineRequest([], greedy(5), out.state, logits=out.logits)])
    ((whole, _, _),) = run([EngineRequest(PROMPT + ids, greedy(5))])
    assert more == whole


def test_abort_returns_the_logits_of_the_returned_state():
    for stop in ([], ["qqqq"]):
        ids, out = abort_after(EngineRequest(list(PROMPT), greedy(10_000, stop=stop)), 4)
        assert out.finish_reason == "abort" and out.usage.completion_tokens == len(ids)
        torch.testing.assert_close(out.logits, reference_logits(PROMPT + ids), atol=1e-4, rtol=1e-4)


def test_continuations_share_a_batch_with_ordinary_requests():
    ((_, _, primed),) = run([EngineRequest(list(PROMPT), greedy(0))])
    other = tok().encode("A different prompt for the other rows")

    async def main():
        eng = Engine(model(), tok(), EngineConfig(max_running=8), start=False)
        try:
            streams = [
                eng.submit(EngineRequest([], greedy(6), primed.state, logits=primed.logits)),
                eng.submit(EngineRequest(list(other), greedy(6))),
                eng.submit(EngineRequest([], greedy(6), primed.state.clone(), logits=primed.logits.clone())),
            ]
            eng.start()
            return await asyncio.gather(*(s.collect() for s in streams)), list(eng.stats)
        finally:
            eng.shutdown()

    (a, b, c), stats = asyncio.run(main())
    assert stats[0].prefill_rows == 1 and stats[0].decode_rows == 3  # one batch of three rows
    ((ref, _, _),) = run([EngineRequest(list(PROMPT), greedy(6))])
    ((ref_other, _, _),) = run([EngineRequest(list(other), greedy(6))])
    assert a[0] == ref and c[0] == ref and b[0] == ref_other


def test_continue_with_zero_tokens_returns_the_same_state_and_logits():
    state = prefix_state(PROMPT)
    logits = reference_logits(PROMPT)
    ((ids, _, out),) = run([EngineRequest([], greedy(0), state, logits=logits)])
    assert ids == [] and out.state.equal(state) and torch.equal(out.logits, logits)


def test_bad_continuations_are_refused_at_submit():
    V = tok().vocab_size
    state = prefix_state(PROMPT[:5])
    good = torch.zeros(V)
    cases = {
        "at least one prompt token": EngineRequest([], greedy(2), state),
        "only used with an empty prompt": EngineRequest([1, 2], greedy(2), state, logits=good),
        "need the state": EngineRequest([], greedy(2), None, logits=good),
        "must be a": EngineRequest([], greedy(2), state, logits=torch.zeros(V + 1)),
        "finite": EngineRequest([], greedy(2), state, logits=torch.full((V,), float("nan"))),
    }

    async def main():
        eng = Engine(model(), tok())
        try:
            for says, req in cases.items():
                with pytest.raises(ValueError, match=says):
                    eng.submit(req)
            return eng.load()
        finally:
            eng.shutdown()

    assert asyncio.run(main())["requests"] == 0
