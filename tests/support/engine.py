"""The engine tests' shared pieces: a tiny random model, the test tokenizer, a text, and a runner."""

from __future__ import annotations

import asyncio
import functools
import random

import torch

from model.config import preset
from model.retnet import RetNet
from server.engine import Engine, EngineConfig, EngineRequest, RequestOutput
from tests.support.bpe import make_test_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Recurrent networks keep a state; " * 4


@functools.cache
def tok():
    return make_test_tokenizer()


@functools.cache
def model() -> RetNet:
    torch.manual_seed(0)
    return RetNet(preset("tiny", vocab_size=tok().vocab_size, eos_token_id=tok().eos_id)).eval()


def prefix_state(ids: list[int]):
    with torch.no_grad():
        return model()(torch.tensor([ids]), None)[1]


# Submission delays for the 7 requests of mixed_requests: some join while others decode.
DELAYS = [0.0, 0.0, 0.002, 0.01, 0.0, 0.03, 0.005]


def copy_req(r: EngineRequest) -> EngineRequest:
    return EngineRequest(list(r.prompt_ids), r.params, r.state.clone() if r.state is not None else None)


def mixed_requests(params_fn) -> list[EngineRequest]:
    """7 requests of mixed lengths from TEXT, every other one resuming a state; params_fn(i) each."""
    ids = tok().encode(TEXT)
    rng = random.Random(1)
    reqs = []
    for i in range(7):
        n = rng.choice([1, 3, 9, 17, 40, 70])
        start = rng.randrange(0, len(ids) - n)
        state = prefix_state(ids[: 5 + i]) if i % 2 else None  # mixed resumed sessions
        reqs.append(EngineRequest(ids[start : start + n], params_fn(i), state))
    return reqs


def abort_after(req: EngineRequest, n: int) -> tuple[list[int], RequestOutput]:
    """Submit `req` alone, abort it once `n` tokens have arrived; (the token ids, the final output)."""

    async def main():
        eng = Engine(model(), tok())
        try:
            stream = eng.submit(req)
            ids: list[int] = []
            async for out in stream:
                ids += out.token_ids
                if len(ids) >= n and not out.finished:
                    stream.abort()
                if out.finished:
                    return ids, out
        finally:
            eng.shutdown()

    return asyncio.run(main())


def run(
    requests,
    config: EngineConfig | None = None,
    delays=None,
    stats: list | None = None,
    on: RetNet | None = None,
):
    """Run requests on one engine over `on` (default: model()), request i submitted after delays[i]
    seconds; collect results. `stats`: a list that receives the engine's IterationStats (to check what
    shared a batch)."""

    async def one(eng, req, delay):
        await asyncio.sleep(delay)
        return await eng.submit(req).collect()

    async def main():
        eng = Engine(on or model(), tok(), config or EngineConfig(prefill_chunk=16, prefill_budget=32))
        try:
            ds = delays or [0.0] * len(requests)
            return await asyncio.gather(*(one(eng, r, d) for r, d in zip(requests, ds, strict=True)))
        finally:
            eng.shutdown()
            if stats is not None:
                stats.extend(eng.stats)

    return asyncio.run(main())
