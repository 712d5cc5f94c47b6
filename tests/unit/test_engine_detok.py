"""Incremental detokenisation and stop strings: hold-back, split matches, multibyte characters."""

from __future__ import annotations

import asyncio

from server.engine import Detokenizer, Engine, EngineRequest, EngineSamplingParams
from tests.support.engine import model, tok


def feed(d: Detokenizer, ids: list[int]):
    """Per token: (reported ids, text, found); ranks 0..255 of the test tokenizer are single bytes."""
    return [d.add(i) for i in ids]


def test_multibyte_character_is_never_split():
    d = Detokenizer(tok(), [])
    data = "aé€😀".encode()
    steps = feed(d, list(data))
    texts = [t for _, t, _ in steps]
    assert "".join(texts) == "aé€😀"
    assert all("\ufffd" not in t for t in texts)
    assert texts == ["a", "", "é", "", "", "€", "", "", "", "😀"]
    assert d.num_reported == len(data)  # tokens are reported even when their text waits


def test_incomplete_character_at_the_end_becomes_replacement():
    d = Detokenizer(tok(), [])
    feed(d, list("é".encode())[:1])
    assert d.flush() == ([], "\ufffd")


def feed_until_stop(d: Detokenizer, data: bytes):
    out = []
    for b in data:
        out.append(d.add(b))
        if out[-1][2]:
            break
    return out


def test_stop_string_split_across_tokens_is_held_back_and_cut():
    d = Detokenizer(tok(), ["lo w"])
    out = feed_until_stop(d, b"hello world")
    assert len(out) == len(b"hello w")  # found on the token completing the match
    assert [t for _, t, _ in out] == ["h", "e", "", "l", "", "", ""]
    # 'l', 'o', ' ' were held back; the 'l' holding the stop string's first byte is cut with it
    assert d.num_reported == 3
    assert sum(len(ids) for ids, _, _ in out) == 3


def test_partial_match_that_fails_is_released():
    d = Detokenizer(tok(), ["abc"])
    out = feed(d, list(b"xabd"))
    assert [t for _, t, _ in out] == ["x", "", "", "abd"]
    assert not any(f for *_, f in out)


def test_stop_string_inside_a_multibyte_token_run():
    d = Detokenizer(tok(), ["€"])
    out = feed_until_stop(d, "a€b".encode())
    assert "".join(t for _, t, _ in out) == "a"
    assert out[-1][2] is True and len(out) == 4 and d.num_reported == 1


def test_min_tokens_disables_stop_strings_for_the_first_tokens():
    d = Detokenizer(tok(), ["a"], min_tokens=2)
    out = feed_until_stop(d, b"aaa")
    assert [t for _, t, _ in out] == ["a", "a", ""]
    assert out[2][2] is True and d.num_reported == 2


def test_stop_token_flushes_pending_and_has_no_text():
    d = Detokenizer(tok(), ["xyz"])
    feed(d, list(b"abx"))
    ids, text, found = d.add(tok().eos_id, is_stop_token=True)
    assert ids == [ord("x"), tok().eos_id] and text == "x" and not found


def test_engine_text_deltas_never_split_characters():
    """Sampled byte-level output: the deltas concatenate to the one-shot decoding of all ids."""
    bias = {i: 3.0 for i in range(0xC0, 0xF5)}  # favour UTF-8 lead bytes: multibyte prefixes galore

    async def main():
        eng = Engine(model(), tok())
        try:
            reqs = [
                EngineRequest(
                    tok().encode("Les élèves"), EngineSamplingParams(seed=s, max_tokens=40, logit_bias=bias)
                )
                for s in range(6)
            ]
            streams = [eng.submit(r) for r in reqs]
            results = []
            for st in streams:
                ids, deltas = [], []
                async for out in st:
                    ids += out.token_ids
                    deltas.append(out.text)
                results.append((ids, deltas))
            return results
        finally:
            eng.shutdown()

    n_multi = 0
    for ids, deltas in asyncio.run(main()):
        whole = tok().decode([i for i in ids if i != tok().eos_id])  # EOS ends the text, unprinted
        assert "".join(deltas) == whole
        n_multi += sum(len(d.encode()) > len(d) for d in deltas)
        for d in deltas:  # each delta is valid text on its own (no lone surrogates, decodes back)
            assert d.encode("utf-8").decode("utf-8") == d
    assert n_multi > 0  # the test did exercise multibyte characters
