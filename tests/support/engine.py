"""The engine tests' shared pieces: a tiny random model, the test tokenizer, a text, and a runner."""

from __future__ import annotations

import asyncio
import functools

import torch

from model.config import preset
from model.retnet import RetNet
from server.engine import Engine, EngineConfig
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


def run(requests, config: EngineConfig | None = None, delays=None, stats: list | None = None):
    """Run requests on one engine (request i submitted after delays[i] seconds); collect results.

    `stats`: a list that receives the engine's IterationStats (to check what shared a batch)."""

    async def one(eng, req, delay):
        await asyncio.sleep(delay)
        return await eng.submit(req).collect()

    async def main():
        eng = Engine(model(), tok(), config or EngineConfig(prefill_chunk=16, prefill_budget=32))
        try:
            ds = delays or [0.0] * len(requests)
            return await asyncio.gather(*(one(eng, r, d) for r, d in zip(requests, ds, strict=True)))
        finally:
            eng.shutdown()
            if stats is not None:
                stats.extend(eng.stats)

    return asyncio.run(main())
