"""Engine: batched == alone (greedy and seeded), final-state invariant for every finish reason."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine import Engine, EngineConfig, EngineRequest, EngineSamplingParams
from tests.support.engine import (
    DELAYS,
    TEXT,
    abort_after,
    copy_req,
    mixed_requests,
    model,
    prefix_state,
    run,
    tok,
)


def ascii_bias() -> dict[int, float]:
    """Ban every token that is not plain ASCII letters/spaces, so greedy text is readable."""
    t = tok()
    bias = {}
    for i in range(t.vocab_size):
        b = t.token_bytes(i)
        if not (b and all(c == 32 or 97 <= c <= 122 for c in b)):
            bias[i] = -100.0
    return bias


def assert_batched_equals_alone(reqs):
    stats: list = []
    batched = run([copy_req(r) for r in reqs], delays=DELAYS, stats=stats)
    # they really shared batches: decode steps of several rows, and prompts read beside decoding rows
    assert max(s.decode_rows for s in stats) >= 3, [s.decode_rows for s in stats]
    assert any(s.prefill_rows and s.decode_rows for s in stats)
    for r, (ids, text, out) in zip(reqs, batched, strict=True):
        ((alone_ids, alone_text, alone_out),) = run([copy_req(r)])
        assert ids == alone_ids
        assert text == alone_text
        assert out.finish_reason == alone_out.finish_reason
        assert torch.allclose(out.state.layers[0], alone_out.state.layers[0], atol=1e-5)


def test_greedy_batched_equals_alone():
    reqs = mixed_requests(
        lambda i: EngineSamplingParams(temperature=0, max_tokens=[4, 25, 9, 30, 1, 12, 18][i])
    )
    assert_batched_equals_alone(reqs)


def test_seeded_sampling_batched_equals_alone():
    def params(i):
        return EngineSamplingParams(
            temperature=0.9,
            top_k=[0, 40][i % 2],
            top_p=[1.0, 0.9][i % 2],
            min_p=0.02 * (i % 3),
            repetition_penalty=1.0 + 0.1 * (i % 2),
            presence_penalty=0.3 * (i % 3 == 1),
            frequency_penalty=0.2 * (i % 3 == 2),
            seed=100 + i,
            max_tokens=6 + 3 * i,
        )

    reqs = mixed_requests(params)
    assert_batched_equals_alone(reqs)
    # and seeds matter: another seed gives another completion for at least one request
    other = [EngineRequest(r.prompt_ids, EngineSamplingParams(**{**vars(r.params), "seed": 7})) for r in reqs]
    assert [o[0] for o in run(other)] != [o[0] for o in run([copy_req(r) for r in reqs])]


def continue_logits(prompt, state0, completion, final_state):
    """(logits continuing from the returned state, logits re-reading prompt + completion from scratch)."""
    probe = [5]
    with torch.no_grad():
        cont, _ = model()(torch.tensor([probe]), final_state)
        ref, _ = model()(torch.tensor([prompt + completion + probe]), state0.clone() if state0 else None)
    return cont[0, -1], ref[0, -1]


def check_final_state(req: EngineRequest, ids, out):
    assert out.usage.completion_tokens == len(ids)
    assert out.usage.prompt_tokens == len(req.prompt_ids)
    start = 0 if req.state is None else int(req.state.position[0])
    assert int(out.state.position[0]) == start + len(req.prompt_ids) + len(ids)
    cont, ref = continue_logits(req.prompt_ids, req.state, ids, out.state)
    torch.testing.assert_close(cont, ref, atol=1e-4, rtol=1e-4)


def greedy_text_and_ids(prompt, bias, n=24):
    ((ids, text, _),) = run(
        [EngineRequest(prompt, EngineSamplingParams(temperature=0, max_tokens=n, logit_bias=bias))]
    )
    return ids, text


@pytest.mark.parametrize("resumed", [False, True])
def test_final_state_every_finish_reason(resumed):
    t = tok()
    prompt = t.encode("The dog sleeps in the sun, and")
    state = prefix_state(t.encode("Serving models well")) if resumed else None
    eos = t.eos_id
    bias = ascii_bias()
    ids, text = greedy_text_and_ids(prompt, bias)
    stop_tok = ids[3]
    # a stop string starting inside a multi-character token and ending in a later one
    offs, pos = [], 0
    for i in ids:
        offs.append(pos)
        pos += len(t.token_bytes(i))
    k = next(j for j in range(2, len(ids) - 1) if len(t.token_bytes(ids[j])) >= 2)
    stop = text[offs[k] + 1 : offs[k + 1] + 1]
    first = text.find(stop)
    cut = max(j for j in range(len(ids)) if offs[j] <= first)
    cases = {
        "length": EngineSamplingParams(temperature=0, max_tokens=7, logit_bias=bias),
        "eos": EngineSamplingParams(temperature=0, max_tokens=20, min_tokens=3, logit_bias={eos: 100.0}),
        "stop_token": EngineSamplingParams(
            temperature=0, max_tokens=20, logit_bias=bias, stop_token_ids=[stop_tok], ignore_eos=True
        ),
        "stop": EngineSamplingParams(temperature=0, max_tokens=24, logit_bias=bias, stop=["zzzq", stop]),
    }
    reqs = {name: EngineRequest(list(prompt), p, state) for name, p in cases.items()}
    results = run(list(reqs.values()))
    for (name, req), (got_ids, got_text, out) in zip(reqs.items(), results, strict=True):
        assert out.finish_reason == name, name
        check_final_state(req, got_ids, out)
        if name == "eos":
            assert got_ids == [got_ids[0], got_ids[1], got_ids[2], eos] and eos not in got_ids[:3]
            assert "<|endoftext|>" not in got_text
        if name == "stop_token" and not resumed:
            assert got_ids == ids[: ids.index(stop_tok) + 1]
        if name == "stop" and not resumed:
            assert got_ids == ids[:cut]
            assert got_text == t.decode(ids[:cut])
            assert stop not in got_text


def test_final_state_after_abort():
    t = tok()
    for stop in ([], ["qqqq"]):
        req = EngineRequest(
            t.encode("It's a small story"), EngineSamplingParams(temperature=0, max_tokens=10_000, stop=stop)
        )
        ids, out = abort_after(req, 5)
        assert out.finish_reason == "abort"
        check_final_state(req, ids, out)


def test_logprobs_reported_per_token():
    p = EngineSamplingParams(temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    ((ids, _, _),) = run([EngineRequest(tok().encode("The fox"), p)])
    assert len(ids) == 5

    async def main():
        eng = Engine(model(), tok())
        try:
            lps = []
            async for o in eng.submit(EngineRequest(tok().encode("The fox"), p)):
                lps += o.logprobs
            return lps
        finally:
            eng.shutdown()

    lps = asyncio.run(main())
    assert [lp.token_id for lp in lps] == ids
    for lp in lps:  # greedy: the chosen token is the best alternative
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id and lp.logprob == pytest.approx(lp.top[0][1])


def test_engine_matches_the_reference_generate_loop():
    """A greedy request alone gives what `model.sampling.generate` gives (ids and final state)."""
    from model.sampling import SamplingParams, generate

    prompt = tok().encode(TEXT)[:50]
    ((ids, _, out),) = run([EngineRequest(prompt, EngineSamplingParams(temperature=0, max_tokens=20))])
    with torch.no_grad():
        ref_ids, ref_state = generate(model(), prompt, 20, SamplingParams(temperature=0))
    assert ids == ref_ids
    torch.testing.assert_close(out.state.layers[-1], ref_state.layers[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # subprocesses / compilation: `make test` runs it, `make test-fast` does not
def test_compiled_decode_step_matches_eager():
    """torch.compile'd decode (one bucket of 8: every batch padded to it) gives the eager greedy outputs."""
    reqs = mixed_requests(
        lambda i: EngineSamplingParams(temperature=0, max_tokens=[4, 25, 9, 30, 1, 12, 18][i])
    )
    cfg = EngineConfig(prefill_chunk=16, prefill_budget=32, compile=True, compile_buckets=(8,))
    stats: list = []
    compiled = run([copy_req(r) for r in reqs], config=cfg, delays=DELAYS, stats=stats)
    assert max(s.decode_rows for s in stats) >= 3  # batches of several rows (padded to the bucket of 8)
    eager = run([copy_req(r) for r in reqs])
    for (ids, text, out), (e_ids, e_text, e_out) in zip(compiled, eager, strict=True):
        assert (ids, text, out.finish_reason) == (e_ids, e_text, e_out.finish_reason)
        for a, b in zip(out.state.layers, e_out.state.layers, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert torch.equal(out.state.position, e_out.state.position)
