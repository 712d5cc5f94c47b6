"""Tokenizer training: HF byte-level BPE -> tiktoken ranks with identical ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from model.tokenizer import GPT2_PATTERN, Tokenizer
from training.tokenizer_train import (
    EOT,
    REPORT_FILE,
    TokenizerTrainError,
    build_hf_tokenizer,
    bytes_to_unicode,
    check_pre_tokenizer,
    hf_pieces,
    hf_to_tiktoken,
    iter_jsonl_texts,
    tiktoken_pieces,
    train_bpe,
    train_tokenizer_from_corpus,
    verify_round_trip,
)

VOCAB = 500

_PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs into "
    "the forest. It's a small story, but it's ours: we'll tell it again, because they're fond of it.",
    "Recurrent networks keep a state; retention networks keep a state too. A state that can be saved, "
    "restored and resumed lets a server continue a conversation without reading the whole history.",
    "Serving models well means batching requests, streaming tokens, and keeping memory under control. "
    "In 2024 there were 366 days; in 2025 there are 365, and 1,000,000 seconds is about 11.57 days.",
    "def main(argv: list[str]) -> int:\n    for i in range(10):\n        print(f'step {i}: loss={i:.3f}')\n"
    "    return 0\n\n\nif __name__ == '__main__':\n    raise SystemExit(main([]))\n",
    "Les élèves étudient la théorie à l'école; après les cours, ils mangent des crêpes au café.",
    "Der Bär läuft über die Straße, und die Größe der Häuser überrascht ihn. Schöne Grüße!",
    "Быстрая коричневая лиса прыгает через ленивую собаку. Ελληνικά: καλημέρα κόσμε.",
    "敏捷的棕色狐狸跳过了懒狗。我们今天学习中文和日本語。東京は大きい都市です。빠른 갈색 여우.",
    "Emoji: 😀 😃 👍🏽 👨‍👩‍👧 🇺🇳 ❤️ 🚀✨ — and combining marks: é ñ; tabs\tand  double  spaces.",
]
TRAIN_TEXTS = [f"{p} (#{i})" for i in range(8) for p in _PARAGRAPHS]

HELDOUT = [
    "A lazy fox? No: the quick one! It's what we'd've said, isn't it, y'all?",
    "Résumé, naïve, façade, Ærøskøbing, São Paulo — déjà vu. Zoë's café: crème brûlée.",
    "中文分词很难。日本語のテキスト、カタカナ、ひらがな。한국어 문장입니다.",
    "Emoji 🤖🧠 👩🏾‍💻 🏳️‍🌈 and flags 🇫🇷🇯🇵; zero-width\u200bjoiner\u200d here.",
    "Numbers: 3.14159, 2.71828, 6.022e23, -42, +7, 0x1F, 1_000_000 and 12345678901234567890.",
    "Whitespace   runs\t\t\tand\n\n\n\nnewlines  \n  \r\n\r\ntrailing   ",
    "    indented:\n        for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C-ish\n",
    "The document ends here.<|endoftext|>A new one starts <|endoftext|>twice.",
    "<|endoftext|>",
    "",
    " ",
    "\x00\x01\x7f\u00a0\u3000\u2028 control and odd spaces",
]

TRICKY_SPLITS = [
    "I'm you're we'll they've don't she'd it's 'S 'LL O'Neil",
    "a  b   c    d\t\te\n\n\nf \n g  ",
    "   leading and trailing   ",
    "line1\r\nline2\r\n\r\n    line3",
    "x=1;y=2  # comment\n\tz = [1, 2, 3]",
]


@pytest.fixture(scope="module")
def trained() -> tuple[tokenizers.Tokenizer, Tokenizer]:
    return train_bpe(TRAIN_TEXTS, vocab_size=VOCAB, show_progress=False)


def _hf_ids(hf_tok: tokenizers.Tokenizer, text: str, specials_as_text: bool = True) -> list[int]:
    prev = hf_tok.encode_special_tokens
    hf_tok.encode_special_tokens = specials_as_text
    try:
        return hf_tok.encode(text, add_special_tokens=False).ids
    finally:
        hf_tok.encode_special_tokens = prev


def test_vocab_size_and_eos(trained):
    hf_tok, tok = trained
    assert tok.vocab_size == VOCAB == hf_tok.get_vocab_size()
    assert len(tok.mergeable_ranks) == VOCAB - 1
    assert tok.eos_token == EOT
    assert tok.eos_id == VOCAB - 1 == hf_tok.token_to_id(EOT)
    assert tok.special_tokens == {EOT: VOCAB - 1}
    assert sorted(tok.mergeable_ranks.values()) == list(range(VOCAB - 1))


def test_several_specials_take_the_last_ids():
    specials = (EOT, "<|pad|>")
    hf_tok, tok = train_bpe(TRAIN_TEXTS, vocab_size=400, special_tokens=specials, show_progress=False)
    assert tok.special_tokens == {EOT: 398, "<|pad|>": 399}
    assert [hf_tok.token_to_id(s) for s in specials] == [398, 399]
    assert tok.vocab_size == 400 and tok.eos_id == 398


def test_conversion_round_trips_on_heldout(trained):
    hf_tok, tok = trained
    for text in HELDOUT:
        ids = tok.encode(text)
        assert ids == _hf_ids(hf_tok, text), text
        assert tok.decode(ids) == text
    stats = verify_round_trip(hf_tok, tok, HELDOUT)
    assert stats["docs"] == len(HELDOUT)
    assert stats["chars"] == sum(map(len, HELDOUT))
    assert stats["tokens"] == sum(len(tok.encode(t)) for t in HELDOUT)
    assert stats["docs_with_special_text"] == 2
    assert 1.0 <= stats["bytes_per_token"] < 10


def test_endoftext_literal_is_ordinary_text(trained):
    hf_tok, tok = trained
    text = "end<|endoftext|>start"
    plain = tok.encode(text)
    assert tok.eos_id not in plain
    assert tok.decode(plain) == text
    special = tok.encode(text, allow_special=True)
    assert special.count(tok.eos_id) == 1
    assert special == _hf_ids(hf_tok, text, specials_as_text=False)


def test_saved_files_reload_with_identical_ids(trained, tmp_path):
    _, tok = trained
    tok.save(tmp_path)
    loaded = Tokenizer.from_dir(tmp_path)
    assert dict(loaded.mergeable_ranks) == dict(tok.mergeable_ranks)
    assert loaded.eos_token == EOT and loaded.eos_id == tok.eos_id
    for text in HELDOUT:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.encode(text, allow_special=True) == tok.encode(text, allow_special=True)


def test_tiktoken_pieces_probe_reports_real_splits():
    assert tiktoken_pieces("I'm  here\n\n") == [b"I", b"'m", b" ", b" here", b"\n\n"]
    assert tiktoken_pieces("a1 22") == [b"a", b"1", b" 22"]


@pytest.mark.parametrize("text", TRICKY_SPLITS)
def test_pre_tokenisation_equals_tiktoken(trained, text):
    hf_tok, _ = trained
    pieces = hf_pieces(hf_tok, text)
    assert pieces == tiktoken_pieces(text, GPT2_PATTERN)
    assert b"".join(pieces) == text.encode("utf-8")


def test_pre_tokenizer_check_can_fail():
    wrong = build_hf_tokenizer()
    wrong.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    with pytest.raises(TokenizerTrainError, match="pre-tokenisation differs"):
        check_pre_tokenizer(wrong)
    check_pre_tokenizer(build_hf_tokenizer())


def test_corrupted_ranks_are_caught(trained):
    hf_tok, tok = trained
    ranks = dict(tok.mergeable_ranks)
    used = [i for i in dict.fromkeys(tok.encode(HELDOUT[0])) if i >= 256]
    a, b = (next(k for k, v in ranks.items() if v == i) for i in used[:2])
    ranks[a], ranks[b] = ranks[b], ranks[a]
    bad = Tokenizer(ranks, tok.pattern, tok.special_tokens, eos_token=EOT)
    with pytest.raises(TokenizerTrainError, match="differs at token"):
        verify_round_trip(hf_tok, bad, HELDOUT)


def test_empty_heldout_is_an_error(trained):
    with pytest.raises(TokenizerTrainError, match="no held-out texts"):
        verify_round_trip(*trained, [])


def test_wrong_special_id_is_caught(trained):
    hf_tok, tok = trained
    bad = Tokenizer(tok.mergeable_ranks, tok.pattern, {EOT: VOCAB}, eos_token=EOT)
    assert verify_round_trip(hf_tok, bad, HELDOUT[:2])["docs"] == 2  # no special text: passes
    with pytest.raises(TokenizerTrainError, match="special tokens: held-out doc 7"):
        verify_round_trip(hf_tok, bad, HELDOUT)


def test_bad_decode_is_caught(trained):
    hf_tok, tok = trained

    class LossyDecode(Tokenizer):
        def decode(self, ids):
            return super().decode(ids).replace("ë", "e")  # "Zoë" is in doc 1 only

    lossy = LossyDecode(tok.mergeable_ranks, tok.pattern, tok.special_tokens, eos_token=EOT)
    assert verify_round_trip(hf_tok, lossy, HELDOUT[:1])["docs"] == 1
    with pytest.raises(TokenizerTrainError, match=r"doc 1: decode\(encode\(text\)\) != text"):
        verify_round_trip(hf_tok, lossy, HELDOUT)


def _toy_hf(extra: dict[str, int], merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
    """A hand-built HF BPE: the 256 byte characters (ids 0..255) plus ``extra``."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))} | extra
    hf_tok = build_hf_tokenizer()
    hf_tok.model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True)
    return hf_tok


def test_merges_tiktoken_cannot_express_are_detected():
    # 'abc' comes from ab+c, but bc merges first, so HF leaves "abcd" as a|bc|d: tiktoken merges a+bc.
    hf_tok = _toy_hf({"bc": 256, "ab": 257, "abc": 258}, [("b", "c"), ("a", "b"), ("ab", "c")])
    with pytest.raises(TokenizerTrainError, match="not rebuilt from their own bytes"):
        hf_to_tiktoken(hf_tok)
    ranks = {bytes([b]): hf_tok.token_to_id(bytes_to_unicode()[b]) for b in range(256)}
    ranks |= {b"bc": 256, b"ab": 257, b"abc": 258}
    with pytest.raises(TokenizerTrainError, match="differs at token"):
        verify_round_trip(hf_tok, Tokenizer(ranks, GPT2_PATTERN, {}), ["abcd"])
    # A token string created by two different merges.
    dup = _toy_hf({"ab": 256, "bc": 257, "abc": 258}, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")])
    with pytest.raises(TokenizerTrainError, match="created by two merges"):
        hf_to_tiktoken(dup)


def test_bytes_to_unicode_is_hf_alphabet():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"


def test_too_small_corpus_is_an_error():
    with pytest.raises(TokenizerTrainError, match="lower vocab_size"):
        train_bpe(["tiny tiny text"], vocab_size=VOCAB, show_progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(TRAIN_TEXTS, vocab_size=200, show_progress=False)
    with pytest.raises(ValueError, match="eos_token"):
        train_bpe(TRAIN_TEXTS, special_tokens=("<|pad|>",), show_progress=False)


def _write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"source": "test", "id": str(i), "text": t}) + "\n")


def test_train_tokenizer_from_corpus(tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "tok"
    corpus.mkdir()
    _write_jsonl(corpus / "train.jsonl", TRAIN_TEXTS)
    _write_jsonl(corpus / "val.jsonl", HELDOUT)
    max_chars = sum(map(len, TRAIN_TEXTS)) - 10  # cuts the last doc
    report = train_tokenizer_from_corpus(
        corpus, out, vocab_size=400, max_chars=max_chars, show_progress=False
    )

    assert json.loads((out / REPORT_FILE).read_text()) == report
    assert report["vocab_size"] == 400 and report["eos_id"] == 399
    assert report["training"]["chars"] == max_chars
    assert report["training"]["docs"] == len(TRAIN_TEXTS)
    assert report["round_trip"]["docs"] == len(HELDOUT)
    assert report["wall_time_s"]["total"] > 0
    loaded = Tokenizer.from_dir(out)
    assert loaded.name == "retserve-bpe-8k" and loaded.vocab_size == 400 and loaded.eos_token == EOT
    # The saved ids are those of a fresh, identical training run (HF training is deterministic).
    hf_tok, tok = train_bpe(iter_jsonl_texts(corpus / "train.jsonl", max_chars), 400, show_progress=False)
    assert all(loaded.encode(t) == tok.encode(t) == _hf_ids(hf_tok, t) for t in HELDOUT)


def test_corpus_errors_are_clear(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", TRAIN_TEXTS)
    with pytest.raises(FileNotFoundError, match=r"val\.jsonl"):
        train_tokenizer_from_corpus(tmp_path, tmp_path / "out", vocab_size=400, show_progress=False)
    (tmp_path / "val.jsonl").write_text('{"text": "ok"}\n\n{"text": 3}\n')
    with pytest.raises(TokenizerTrainError, match=r"val\.jsonl:3"):
        list(iter_jsonl_texts(tmp_path / "val.jsonl"))
    assert list(iter_jsonl_texts(tmp_path / "train.jsonl", max_chars=10)) == [TRAIN_TEXTS[0][:10]]
