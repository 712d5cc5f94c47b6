"""Engine regression: identical concurrent requests (same prompt, equal states, same params) in one
iteration. Row membership used to go through dataclass equality, which compared state tensors and
raised "Boolean value of Tensor ... is ambiguous": every request of the batch ended with "error"."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine import Engine, EngineConfig, EngineRequest, EngineSamplingParams
from tests.support.engine import TEXT, model, prefix_state, tok


def test_identical_requests_in_one_iteration_all_finish_normally():
    ids = tok().encode(TEXT)
    base = prefix_state(ids[:12])
    prompt = ids[12:30]

    async def main():
        eng = Engine(model(), tok(), EngineConfig(max_running=16), start=False)
        try:
            reqs = [
                # equal but distinct state objects (what 8 sessions loaded from the store look like)
                EngineRequest(list(prompt), EngineSamplingParams(temperature=0, max_tokens=6), base.clone())
                for _ in range(8)
            ]
            streams = [eng.submit(r) for r in reqs]  # all queued before the loop starts: one iteration
            eng.start()
            results = await asyncio.gather(*(s.collect() for s in streams))
            return results, list(eng.stats)
        finally:
            eng.shutdown()

    results, stats = asyncio.run(main())
    assert stats[0].prefill_rows == 8  # the eight prompts were read in the same iteration
    assert max(s.decode_rows for s in stats) == 8  # ... and decoded as one batch
    outs = [r[2] for r in results]
    assert [o.finish_reason for o in outs] == ["length"] * 8
    first_ids = results[0][0]
    assert len(first_ids) == 6
    assert all(r[0] == first_ids for r in results)
    for o in outs[1:]:
        assert o.state is not None and o.state.equal(outs[0].state)
    # the request states were not changed in place by the engine
    assert base.equal(prefix_state(ids[:12]))
    torch.testing.assert_close(outs[0].state.position, base.position + len(prompt) + 6)


def test_a_request_id_already_in_the_engine_is_refused_until_it_finished():
    def req(rid: str) -> EngineRequest:
        return EngineRequest([1, 2], EngineSamplingParams(temperature=0, max_tokens=2), request_id=rid)

    async def main():
        eng = Engine(model(), tok(), start=False)
        try:
            first = eng.submit(req("same"))
            with pytest.raises(ValueError, match="already in the engine"):
                eng.submit(req("same"))
            eng.start()
            a = await first.collect()
            b = await eng.submit(req("same")).collect()  # finished ids can be used again
            return a, b, eng.load()
        finally:
            eng.shutdown()

    a, b, load = asyncio.run(main())
    assert a[0] == b[0] and len(a[0]) == 2 and load["requests"] == 0


def test_aborting_one_of_identical_requests_waiting_or_running():
    """Aborts look requests up in the queues and the batch: by identity, never by comparing states."""
    ids = tok().encode(TEXT)
    base = prefix_state(ids[:12])

    async def main():
        eng = Engine(model(), tok(), EngineConfig(max_running=4), start=False)
        try:
            streams = [
                eng.submit(
                    EngineRequest(
                        ids[12:30], EngineSamplingParams(temperature=0, max_tokens=20), base.clone()
                    )
                )
                for _ in range(8)
            ]
            streams[7].abort()  # still waiting when the loop starts (4 rows)
            eng.start()
            outs = [[] for _ in streams]

            async def consume(i):
                async for out in streams[i]:
                    outs[i].append(out)
                    if i == 0 and len(outs[0]) == 1:
                        streams[1].abort()  # running beside three identical rows

            await asyncio.gather(*(consume(i) for i in range(8)))
            return outs
        finally:
            eng.shutdown()

    outs = asyncio.run(main())
    finals = [o[-1] for o in outs]
    assert finals[7].finish_reason == "abort" and finals[7].state is None
    assert finals[1].finish_reason == "abort" and finals[1].state is not None
    normal = [i for i in range(7) if i != 1]
    assert all(finals[i].finish_reason == "length" for i in normal)
    tokens = [[t for o in outs[i] for t in o.token_ids] for i in normal]
    assert all(t == tokens[0] for t in tokens) and len(tokens[0]) == 20
