"""Engine under load: abort, mass cancellation, backpressure, chunked prefill, shutdown."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from server.engine import Engine, EngineConfig, EngineOverloaded, EngineRequest, EngineSamplingParams
from tests.support.engine import TEXT, model, tok


def greedy(n: int) -> EngineSamplingParams:
    return EngineSamplingParams(temperature=0, max_tokens=n)


def test_abort_frees_its_row_within_one_iteration():
    async def main():
        eng = Engine(model(), tok())
        try:
            victim = eng.submit(EngineRequest(tok().encode("The fox"), greedy(100_000)))
            got, n_before = 0, None
            async for out in victim:
                got += len(out.token_ids)
                if got >= 3 and n_before is None:
                    n_before = len(eng.stats)
                    victim.abort()
                if out.finished:
                    break
            await asyncio.sleep(0.02)
            # alone in the engine: once it has left, the loop idles and no iteration runs any more
            return out, len(eng.stats) - n_before, eng.load()
        finally:
            eng.shutdown()

    out, iterations, load = asyncio.run(main())
    assert out.finish_reason == "abort" and out.state is not None
    assert iterations <= 2  # the iteration under way, then the one that absorbs its last token
    assert load["requests"] == 0


def test_many_requests_half_cancelled_leave_nothing_behind():
    threads_before = set(threading.enumerate())
    rng = random.Random(0)
    ids = tok().encode(TEXT)

    async def main():
        eng = Engine(model(), tok(), EngineConfig(max_running=16, max_waiting=300, prefill_chunk=16))

        async def consume(stream):
            return await stream.collect()

        tasks, streams = [], []
        for i in range(200):
            n = rng.randint(1, 60)
            p = EngineSamplingParams(
                temperature=rng.choice([0.0, 1.0]),
                max_tokens=rng.randint(1, 12),
                stop=["xq"] if i % 3 else [],
            )
            s = eng.submit(EngineRequest(ids[:n], p))
            streams.append(s)
            tasks.append(asyncio.create_task(consume(s)))
            if i % 20 == 0:
                await asyncio.sleep(0)
        cancelled = rng.sample(range(200), 100)
        for j, i in enumerate(cancelled):
            await asyncio.sleep(rng.random() * 0.002)
            if j % 2:
                tasks[i].cancel()  # the client goes away: leaving the stream aborts the request
            else:
                streams[i].abort()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(200):  # cancelled consumers abort asynchronously: wait for the engine to drain
            if eng.load()["requests"] == 0:
                break
            await asyncio.sleep(0.01)
        load = eng.load()
        sched = eng._runner.sched
        leftovers = (len(sched.waiting), len(sched.prefilling), len(sched.running), eng._runner.batch_state)
        eng.shutdown()
        return results, load, leftovers, eng

    results, load, leftovers, eng = asyncio.run(main())
    assert load["requests"] == 0 and load["queued_prompt_tokens"] == 0
    assert leftovers == (0, 0, 0, None)
    assert not eng.alive and eng.error is None
    finished = [r for r in results if isinstance(r, tuple)]
    assert any(r[2].finish_reason == "abort" for r in finished)
    assert any(r[2].finish_reason == "length" for r in finished)
    assert set(threading.enumerate()) <= threads_before


def test_backpressure_rejects_instead_of_queueing():
    async def main():
        eng = Engine(
            model(),
            tok(),
            EngineConfig(max_running=2, max_waiting=2, max_queued_prompt_tokens=100),
            start=False,
        )
        try:
            ok = [eng.submit(EngineRequest([1, 2, 3], greedy(5))) for _ in range(4)]
            with pytest.raises(EngineOverloaded) as e1:
                eng.submit(EngineRequest([1, 2, 3], greedy(5)))
            assert "requests in the engine" in str(e1.value)
            assert eng.load()["requests"] == 4
            eng.start()
            results = [await s.collect() for s in ok]
            assert all(r[2].finish_reason == "length" for r in results)
            # queued prompt tokens
            eng2 = Engine(model(), tok(), EngineConfig(max_queued_prompt_tokens=100), start=False)
            eng2.submit(EngineRequest([1] * 80, greedy(1)))
            with pytest.raises(EngineOverloaded) as e2:
                eng2.submit(EngineRequest([1] * 30, greedy(1)))
            assert "prompt tokens queued" in str(e2.value)
            eng2.shutdown()
            # after shutdown, submit is refused too
            with pytest.raises(EngineOverloaded):
                eng2.submit(EngineRequest([1], greedy(1)))
        finally:
            eng.shutdown()

    asyncio.run(main())


def test_long_prompt_prefill_is_split_across_iterations():
    ids = tok().encode(TEXT * 3)
    assert len(ids) > 200

    async def main():
        eng = Engine(model(), tok(), EngineConfig(prefill_chunk=32, prefill_budget_decoding=32))
        try:
            stream = eng.submit(EngineRequest(tok().encode("The"), greedy(10_000)))
            running = asyncio.create_task(stream.collect())
            while not eng.stats:
                await asyncio.sleep(0.001)
            long = await eng.submit(EngineRequest(ids, greedy(2))).collect()
            stream.abort()
            await running
            return list(eng.stats), long
        finally:
            eng.shutdown()

    stats, long = asyncio.run(main())
    assert long[2].usage.prompt_tokens == len(ids) and long[2].finish_reason == "length"
    assert max(s.prefill_tokens for s in stats) <= 32
    during = [s for s in stats if s.prefill_tokens == 32]
    assert len(during) >= len(ids) // 32 - 1
    # the running stream kept decoding in the iterations that read the long prompt
    assert all(s.decode_rows >= 1 for s in during)
    assert long[2].timings.prefill_s > 0 and long[2].timings.ttft_s >= long[2].timings.prefill_s


def test_keep_mask_hook_is_applied():
    seen = []

    def keep(req, prompt):
        import torch

        seen.append(len(prompt))
        m = torch.ones(len(prompt), dtype=torch.bool)
        m[1::2] = False
        return m

    async def main(cfg):
        eng = Engine(model(), tok(), cfg)
        try:
            return await eng.submit(EngineRequest(tok().encode(TEXT)[:40], greedy(4))).collect()
        finally:
            eng.shutdown()

    dropped = asyncio.run(main(EngineConfig(keep_mask=keep, prefill_chunk=16)))
    full = asyncio.run(main(EngineConfig(prefill_chunk=16)))
    assert seen == [40]
    assert not dropped[2].state.equal(full[2].state)


def test_invalid_requests_are_refused_and_a_failing_model_ends_each_request_with_error():
    async def main():
        eng = Engine(model(), tok())
        try:
            with pytest.raises(ValueError):
                eng.submit(EngineRequest([], greedy(1)))
            with pytest.raises(ValueError):
                eng.submit(EngineRequest([1], EngineSamplingParams(max_tokens=2, min_tokens=3)))
            with pytest.raises(ValueError):
                eng.submit(EngineRequest([tok().vocab_size], greedy(1)))
        finally:
            eng.shutdown()

        import copy

        broken = copy.deepcopy(model())

        def boom(*args, **kwargs):
            raise RuntimeError("model failure")

        broken.forward = boom
        eng = Engine(broken, tok())
        try:
            for _ in range(3):  # each failed iteration ends its requests; the loop goes on
                ids, _, out = await eng.submit(EngineRequest([1, 2], greedy(3))).collect()
                assert out.finished and out.finish_reason == "error" and ids == [] and out.state is None
            assert eng.alive and eng.error is None and eng.consecutive_failures == 3
            assert eng.load() == {"requests": 0, "queued_prompt_tokens": 0, "rows": 0}
        finally:
            eng.shutdown()
        assert not eng.alive

    asyncio.run(main())


def test_prefill_budget_adapts_to_decoding_rows():
    """Alone, a long prompt is read in big aligned pieces; with rows decoding, in small ones."""
    from model.sampling import SamplingTensors
    from server.engine.detokenizer import Detokenizer
    from server.engine.live import LiveRequest
    from server.engine.scheduler import Scheduler
    from server.engine.types import RequestTimings

    def seq(n: int) -> LiveRequest:
        row = SamplingTensors.from_params([greedy(1)], tok().vocab_size)
        return LiveRequest(
            EngineRequest(list(range(n)), greedy(1)), Detokenizer(tok(), []), row, RequestTimings(0.0), print
        )

    cfg = EngineConfig(prefill_chunk=16, prefill_budget=100, prefill_budget_decoding=20)
    s = Scheduler(cfg)
    a, b = seq(250), seq(10)
    s.waiting.extend([a, b])
    s.admit()
    plan = s.plan_prefill()  # no row decoding: 100 tokens of budget, pieces end on multiples of 16
    assert [(x is a, st, e) for x, st, e in plan] == [(True, 0, 96)]
    a.prefilled = 96
    s.running.append(seq(1))  # a row is decoding now: budget 20 -> one 16-token segment
    assert [(x is a, st, e) for x, st, e in s.plan_prefill()] == [(True, 96, 112)]
    a.prefilled = 240  # 10 tokens left in a, then b's 10 fit in the rest of the budget
    assert [(x is a, st, e) for x, st, e in s.plan_prefill()] == [(True, 240, 250), (False, 0, 10)]
    s.running.clear()
    a.prefilled = 0
    cfg.prefill_budget = 8  # smaller than a segment: still one segment per iteration
    assert [(x is a, st, e) for x, st, e in s.plan_prefill()] == [(True, 0, 16)]
    with pytest.raises(ValueError, match="prefill_budget_decoding"):
        EngineConfig(prefill_budget_decoding=0)


def test_unusable_sampling_params_are_refused_at_submit_and_the_engine_lives_on():
    async def main():
        eng = Engine(model(), tok())
        try:
            with pytest.raises(ValueError, match="top_k"):
                eng.submit(EngineRequest([1, 2], EngineSamplingParams(top_k=2**64, max_tokens=1)))
            ids, _, out = await eng.submit(EngineRequest([1, 2], greedy(2))).collect()
            return ids, out, eng.alive
        finally:
            eng.shutdown()

    ids, out, alive = asyncio.run(main())
    assert alive and len(ids) == 2 and out.finish_reason in ("length", "eos")


def test_a_failing_iteration_ends_its_requests_with_error_and_the_engine_goes_on():
    def keep(req, prompt):
        if prompt[0] == 7:
            raise RuntimeError("injected failure")
        return None

    async def main():
        eng = Engine(model(), tok(), EngineConfig(keep_mask=keep))
        try:
            running = eng.submit(EngineRequest([1, 2, 3], greedy(100_000)))
            got = 0
            async for out in running:  # a stream that is decoding when the failure hits
                got += len(out.token_ids)
                if got >= 2:
                    bad = await eng.submit(EngineRequest([7, 8], greedy(3))).collect()
                    break
            rest = [o async for o in running]
            after = await eng.submit(EngineRequest([1, 2], greedy(2))).collect()
            return bad, rest, after, eng.alive, eng.load()
        finally:
            eng.shutdown()

    bad, rest, after, alive, load = asyncio.run(main())
    assert bad[2].finish_reason == "error" and bad[2].state is None
    assert rest[-1].finished and rest[-1].finish_reason == "error" and rest[-1].state is None
    assert alive and after[2].finish_reason == "length" and len(after[0]) == 2
    assert load["requests"] == 0 and load["queued_prompt_tokens"] == 0
