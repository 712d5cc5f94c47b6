"""Engine: requests with a token-dropping policy (`EngineRequest.dropping`, `model.dropping`)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from model.dropping import DropSpec, prefill_dropping
from server.engine import Engine, EngineConfig, EngineRequest, EngineSamplingParams
from tests.support.engine import TEXT, model, prefix_state, run, tok

PROMPT = tok().encode(TEXT)[:150]


def greedy(n: int) -> EngineSamplingParams:
    return EngineSamplingParams(temperature=0, max_tokens=n)


def test_keep_one_is_exactly_no_dropping():
    """keep == 1 drops nothing: read like any prompt (in pieces under the budget), bit for bit."""
    spec = DropSpec(policy="decayed", keep=1.0, sinks=4, recent=8)
    for state in (None, prefix_state(PROMPT[:9])):
        ((ids, _, plain),) = run([EngineRequest(list(PROMPT), greedy(8), state)])
        stats: list = []
        ((d_ids, _, dropping),) = run(
            [EngineRequest(list(PROMPT), greedy(8), state, dropping=spec)], stats=stats
        )
        assert d_ids == ids and len(ids) == 8
        assert dropping.state.equal(plain.state) and torch.equal(dropping.logits, plain.logits)
        assert dropping.usage.dropped_tokens == 0 and plain.usage.dropped_tokens == 0
        assert max(s.prefill_tokens for s in stats) == 32  # run()'s budget: not read whole


@pytest.mark.parametrize("policy", ["decayed", "norm", "recency", "random"])
def test_dropping_request_reads_what_prefill_dropping_reads(policy):
    spec = DropSpec(policy=policy, keep=0.5, sinks=4, recent=16, seed=3)
    state = prefix_state(PROMPT[:5])
    with torch.no_grad():
        ref = prefill_dropping(model(), torch.tensor([PROMPT]), spec, state=state.clone(), chunk_size=64)
    ((ids, _, read),) = run([EngineRequest(list(PROMPT), greedy(0), state.clone(), dropping=spec)])
    assert ids == [] and read.usage.dropped_tokens == int(ref.dropped[0]) > 0
    assert read.usage.prompt_tokens == len(PROMPT)
    assert read.state.equal(ref.state) and torch.equal(read.logits, ref.logits[0].float())
    assert int(read.state.position[0]) == 5 + len(PROMPT)  # dropped tokens keep their positions
    # generating: the tokens continue from that state (== continuing from the read-only result)
    ((gen_ids, _, gen),) = run([EngineRequest(list(PROMPT), greedy(6), state.clone(), dropping=spec)])
    ((cont_ids, _, _),) = run([EngineRequest([], greedy(6), read.state, logits=read.logits)])
    assert gen_ids == cont_ids and gen.usage.dropped_tokens == read.usage.dropped_tokens


def test_a_dropping_prompt_is_read_whole_and_alone_while_other_rows_decode():
    spec = DropSpec(policy="decayed", keep=0.25, sinks=4, recent=16)
    other = tok().encode("The fox runs")

    async def main():
        cfg = EngineConfig(prefill_chunk=16, prefill_budget=32, prefill_budget_decoding=16)
        eng = Engine(model(), tok(), cfg)
        try:
            running = eng.submit(EngineRequest(list(other), greedy(60)))
            task = asyncio.create_task(running.collect())
            while not eng.stats:
                await asyncio.sleep(0.001)
            waiting = [
                eng.submit(EngineRequest(list(other), greedy(3))),
                eng.submit(EngineRequest(list(PROMPT), greedy(4), dropping=spec)),
                eng.submit(EngineRequest(list(other), greedy(3))),
            ]
            results = await asyncio.gather(*(s.collect() for s in waiting))
            return await task, results, list(eng.stats)
        finally:
            eng.shutdown()

    first, results, stats = asyncio.run(main())
    whole = [s for s in stats if s.prefill_tokens == len(PROMPT)]
    assert len(whole) == 1 and whole[0].prefill_rows == 1  # in one piece, alone
    assert whole[0].decode_rows >= 1  # the running stream decoded in that iteration too
    assert max(s.prefill_tokens for s in stats if s is not whole[0]) <= 16  # the budget held otherwise
    alone = run([EngineRequest(list(other), greedy(60)), EngineRequest(list(other), greedy(3))])
    assert first[0] == alone[0][0]
    assert results[0][0] == alone[1][0] and results[2][0] == alone[1][0]
    assert results[1][2].usage.dropped_tokens > 0 and len(results[1][0]) == 4


def test_bad_dropping_requests_are_refused_at_submit():
    async def main():
        eng = Engine(model(), tok())
        try:
            with pytest.raises(ValueError, match="from_layer"):
                eng.submit(
                    EngineRequest(
                        [1, 2, 3], greedy(1), dropping=DropSpec(policy="norm", keep=0.5, from_layer=2)
                    )
                )
            with pytest.raises(ValueError, match="at least one prompt token"):
                eng.submit(EngineRequest([], greedy(1), dropping=DropSpec(policy="norm", keep=0.5)))
            return eng.load()
        finally:
            eng.shutdown()

    assert asyncio.run(main())["requests"] == 0
