"""Tests for model/tokenizer.py (a tiktoken BPE loaded from a checkpoint directory)."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

from model.tokenizer import (
    GPT2_PATTERN,
    META_FILE,
    RANKS_FILE,
    Tokenizer,
    TokenizerError,
)
from tests.support.bpe import EOT, SAMPLE_TEXT, make_test_tokenizer

HAND_PICKED = [
    "",
    " ",
    "a",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\n",
    "it's we'll they're I've don't",
    "numbers 1234567890 3.14159 -42 1e-9",
    "😀👍🏽🚀✨❤️",
    "👨‍👩‍👧‍👦 family (zero-width joiners)",
    "🇺🇳🇫🇷 flags",
    "中文字符和日本語のテキスト、한국어 텍스트",
    "é vs e\u0301 (precomposed vs combining), Z̤͔ͧ̑̓ a\u0300\u0301\u0302\u0303",
    "مرحبا بالعالم — שלום עולם (RTL) \u202eRLO override\u202c",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffBOM",
    "controls \x00\x01\x07\x1b[31m\x7f\x85\x9f end",
    "\U0010fffd \U000e0001 \U0001d11e private/tag/music",
    "\ufffd replacement char itself",
    EOT,
    f"text {EOT} more text {EOT}{EOT}",
    "<|endoftext",
    "<|unknown|>",
]

# Ranges to draw code points from: ASCII, Latin/Greek/Cyrillic, Arabic/Hebrew/Indic, combining marks,
# CJK, Hangul, specials and private use, the supplementary planes (emoji, historic scripts, plane 14).
_RANGES = [
    (0x00, 0x7F),
    (0x80, 0x24F),
    (0x300, 0x36F),
    (0x370, 0x4FF),
    (0x590, 0x6FF),
    (0x900, 0x97F),
    (0x2000, 0x206F),
    (0x3000, 0x30FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0xE000, 0xF8FF),
    (0xFE00, 0xFFFF),
    (0x10000, 0x1FFFF),
    (0x1F300, 0x1FAFF),
    (0x20000, 0x2FFFF),
    (0xE0000, 0xE01EF),
    (0xF0000, 0x10FFFF),
]


def _random_text(rng: random.Random, max_len: int) -> str:
    chars = []
    for _ in range(rng.randint(0, max_len)):
        lo, hi = rng.choice(_RANGES)
        cp = rng.randint(lo, hi)
        if 0xD800 <= cp <= 0xDFFF:  # surrogates are not encodable as UTF-8
            cp = 0x20
        chars.append(chr(cp))
    return "".join(chars)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_test_tokenizer(300)


def _write_meta(d: Path, **overrides: object) -> None:
    meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
    meta.update(overrides)
    (d / META_FILE).write_text(json.dumps(meta), encoding="utf-8")


@pytest.fixture()
def saved_dir(tok: Tokenizer, tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    tok.save(d)
    return d


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("text", HAND_PICKED)
def test_round_trip_hand_picked(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_round_trip_random_code_points(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        text = _random_text(rng, 60)
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_round_trip_random_mixed_with_sample_words(tok: Tokenizer) -> None:
    rng = random.Random(99)
    words = SAMPLE_TEXT.split()
    for _ in range(100):
        parts = [rng.choice(words) if rng.random() < 0.7 else _random_text(rng, 5) for _ in range(20)]
        text = rng.choice([" ", "", "\n", "  "]).join(parts)
        assert tok.decode(tok.encode(text)) == text


def test_lone_surrogate_becomes_replacement_char(tok: Tokenizer) -> None:
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


def test_decode_partial_utf8_uses_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    raw = b"".join(tok.token_bytes(i) for i in ids)
    assert raw == "😀".encode()
    # Dropping the last token cuts the 4-byte character; decode must not raise.
    if len(ids) > 1:
        assert "\ufffd" in tok.decode(ids[:-1])
    assert tok.decode_bytes([0xF0]) == b"\xf0"
    assert tok.decode([0xF0]) == "\ufffd"


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = HAND_PICKED[:12]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(iter(texts), allow_special=True) == [
        tok.encode(t, allow_special=True) for t in texts
    ]
    assert tok.encode_batch([]) == []
    with pytest.raises(TypeError):
        tok.encode_batch("not a list")


def test_encode_rejects_non_str(tok: Tokenizer) -> None:
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_decode_accepts_int_like_ids(tok: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    ids = tok.encode("hello world")
    assert tok.decode(torch.tensor(ids)) == "hello world"
    assert tok.decode(tuple(ids)) == "hello world"
    with pytest.raises(TokenizerError, match="not an integer"):
        tok.decode([1.5])  # type: ignore[list-item]


# ---------------------------------------------------------------- BPE quality


def test_ranks_layout(tok: Tokenizer) -> None:
    ranks = tok.mergeable_ranks
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert sorted(ranks.values()) == list(range(299))
    assert tok.special_tokens == {EOT: 299}
    assert tok.vocab_size == 300
    assert len(make_test_tokenizer(400).mergeable_ranks) == 399


def test_merges_compress_english(tok: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog, and the state is saved and restored."
    ids = tok.encode(text)
    assert len(ids) < 0.8 * len(text.encode("utf-8"))
    assert any(i >= 256 for i in ids)
    bigger = make_test_tokenizer(512)
    assert len(bigger.encode(text)) < len(ids)


def test_fixture_is_deterministic() -> None:
    from tests.support.bpe import learn_bpe_ranks

    assert learn_bpe_ranks(SAMPLE_TEXT, 50) == learn_bpe_ranks(SAMPLE_TEXT, 50)
    assert learn_bpe_ranks(SAMPLE_TEXT, 50) == dict(list(learn_bpe_ranks(SAMPLE_TEXT, 80).items())[:306])


# ---------------------------------------------------------------- special tokens


def test_special_token_encoding(tok: Tokenizer) -> None:
    eot_id = tok.special_tokens[EOT]
    text = f"hello{EOT}world"
    with_special = tok.encode(text, allow_special=True)
    without = tok.encode(text)
    assert with_special.count(eot_id) == 1
    assert with_special == [*tok.encode("hello"), eot_id, *tok.encode("world")]
    assert eot_id not in without
    assert tok.decode(without) == text
    assert tok.decode(with_special) == text
    assert tok.encode(EOT) != [eot_id]
    assert tok.token_bytes(eot_id) == EOT.encode()
    assert tok.is_special(eot_id)
    assert not tok.is_special(tok.encode("a")[0])


def test_role_ids(tok: Tokenizer) -> None:
    assert tok.eos_token == EOT
    assert tok.eos_id == 299
    assert tok.bos_id is None and tok.pad_id is None
    ranks = dict(tok.mergeable_ranks)
    t2 = Tokenizer(
        ranks,
        GPT2_PATTERN,
        {EOT: 299, "<|bos|>": 300, "<|pad|>": 305},
        eos_token=EOT,
        bos_token="<|bos|>",
        pad_token="<|pad|>",
    )
    assert (t2.eos_id, t2.bos_id, t2.pad_id) == (299, 300, 305)
    assert t2.vocab_size == 306
    assert t2.encode("<|bos|>x", allow_special=True)[0] == 300


def test_special_tokens_property_is_a_copy(tok: Tokenizer) -> None:
    specials = tok.special_tokens
    specials["<|x|>"] = 1000
    assert "<|x|>" not in tok.special_tokens


def test_role_token_must_be_special(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="eos_token '<\\|nope\\|>' is not one of the special tokens"):
        Tokenizer(dict(tok.mergeable_ranks), GPT2_PATTERN, {EOT: 299}, eos_token="<|nope|>")


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip(tok: Tokenizer, saved_dir: Path) -> None:
    loaded = Tokenizer.from_dir(saved_dir)
    assert dict(loaded.mergeable_ranks) == dict(tok.mergeable_ranks)
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.pattern == tok.pattern == GPT2_PATTERN
    assert (loaded.name, loaded.eos_token, loaded.bos_token, loaded.pad_token) == (
        tok.name,
        tok.eos_token,
        tok.bos_token,
        tok.pad_token,
    )
    assert loaded.vocab_size == tok.vocab_size
    rng = random.Random(5)
    texts = [*HAND_PICKED, SAMPLE_TEXT] + [_random_text(rng, 40) for _ in range(50)]
    for text in texts:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
    # Saving what was loaded reproduces the files byte for byte.
    again = saved_dir.parent / "again"
    loaded.save(again)
    for f in (RANKS_FILE, META_FILE):
        assert (again / f).read_bytes() == (saved_dir / f).read_bytes()


def test_saved_files_format(saved_dir: Path) -> None:
    lines = (saved_dir / RANKS_FILE).read_bytes().splitlines()
    assert len(lines) == 299
    assert lines[0] == base64.b64encode(b"\x00") + b" 0"
    assert lines[65] == b"QQ== 65"
    meta = json.loads((saved_dir / META_FILE).read_text(encoding="utf-8"))
    assert meta == {
        "format": "tiktoken",
        "version": 1,
        "pattern": GPT2_PATTERN,
        "special_tokens": {EOT: 299},
        "eos_token": EOT,
        "bos_token": None,
        "pad_token": None,
        "name": "retserve-test-bpe-300",
    }
    assert not [p.name for p in saved_dir.iterdir() if p.name not in (RANKS_FILE, META_FILE)]


def test_loads_tiktoken_standard_file_layout(tok: Tokenizer, tmp_path: Path) -> None:
    # Lines in any order, CRLF endings and blank lines, as other writers may produce.
    items = list(tok.mergeable_ranks.items())
    random.Random(0).shuffle(items)
    body = b"\r\n".join(base64.b64encode(t) + b" " + str(r).encode() for t, r in items) + b"\r\n\r\n"
    d = tmp_path / "x"
    tok.save(d)
    canonical = (d / RANKS_FILE).read_bytes()
    (d / RANKS_FILE).write_bytes(body)
    loaded = Tokenizer.from_dir(d)
    assert dict(loaded.mergeable_ranks) == dict(tok.mergeable_ranks)
    # save() writes lines in rank order, whatever order the ranks were read in.
    loaded.save(tmp_path / "y")
    assert (tmp_path / "y" / RANKS_FILE).read_bytes() == canonical


def test_optional_meta_keys_default(saved_dir: Path) -> None:
    meta = json.loads((saved_dir / META_FILE).read_text(encoding="utf-8"))
    for k in ("eos_token", "bos_token", "pad_token", "name"):
        del meta[k]
    (saved_dir / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    t = Tokenizer.from_dir(saved_dir)
    assert t.eos_id is None and t.name == "retserve-bpe"


# ---------------------------------------------------------------- errors


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


@pytest.mark.parametrize(("missing", "mentions"), [(RANKS_FILE, "BPE ranks"), (META_FILE, "JSON object")])
def test_missing_file(saved_dir: Path, missing: str, mentions: str) -> None:
    (saved_dir / missing).unlink()
    with pytest.raises(FileNotFoundError) as ei:
        Tokenizer.from_dir(saved_dir)
    msg = str(ei.value)
    assert str(saved_dir / missing) in msg
    assert mentions in msg


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (b"QQ==", "expected 'base64\\(token_bytes\\) rank'"),
        (b"QQ== 65 extra", "expected 'base64\\(token_bytes\\) rank'"),
        (b"!!!! 300", "not valid base64"),
        (b"QQ= 300", "not valid base64"),
        (b"enp6 -1", "not a non-negative decimal integer"),
        (b"enp6 abc", "not a non-negative decimal integer"),
        (b"enp6 1_0", "not a non-negative decimal integer"),
        (b"enp6 99999999999", "exceeds"),
        (b"QQ== 300", "token b'A' already appeared on line 66"),
        (b"enp6 65", "rank 65 already used on line 66"),
    ],
)
def test_corrupt_ranks_line(saved_dir: Path, line: bytes, match: str) -> None:
    path = saved_dir / RANKS_FILE
    path.write_bytes(path.read_bytes() + line + b"\n")
    with pytest.raises(TokenizerError, match=match) as ei:
        Tokenizer.from_dir(saved_dir)
    assert "line 300" in str(ei.value)


def test_empty_ranks_file(saved_dir: Path) -> None:
    (saved_dir / RANKS_FILE).write_bytes(b"\n")
    with pytest.raises(TokenizerError, match="holds no tokens"):
        Tokenizer.from_dir(saved_dir)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid UTF-8 JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"format": "tiktoken"}', "missing required keys"),
    ],
)
def test_bad_meta_json(saved_dir: Path, content: str, match: str) -> None:
    (saved_dir / META_FILE).write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_dir(saved_dir)


def test_meta_not_utf8(saved_dir: Path) -> None:
    (saved_dir / META_FILE).write_bytes(b'{"name": "\xff"}')
    with pytest.raises(TokenizerError, match="not valid UTF-8 JSON"):
        Tokenizer.from_dir(saved_dir)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"format": "sentencepiece"}, "format must be 'tiktoken'"),
        ({"version": 2}, "unsupported version 2"),
        ({"version": True}, "unsupported version True"),
        ({"pattern": ""}, "pattern must be a non-empty string"),
        ({"pattern": 5}, "pattern must be a non-empty string"),
        ({"special_tokens": [EOT]}, "special_tokens must be an object"),
        ({"special_tokens": {EOT: "299"}}, "must map to an integer id"),
        ({"special_tokens": {EOT: True}}, "must map to an integer id"),
        ({"eos_token": 299}, "eos_token must be a string or null"),
        ({"eos_token": "<|eos|>"}, "eos_token '<\\|eos\\|>' is not one of the special tokens"),
        ({"name": 3}, "name must be a string"),
        ({"eos": EOT}, "unknown keys \\['eos'\\]"),
        ({"pattern": "(unclosed"}, "invalid pre-tokenisation pattern"),
        ({"pattern": "[a-z]+"}, "does not split text into pieces that cover it"),
    ],
)
def test_invalid_meta_values(saved_dir: Path, overrides: dict[str, object], match: str) -> None:
    _write_meta(saved_dir, **overrides)
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_dir(saved_dir)


def test_pattern_matching_empty_string_is_rejected(tok: Tokenizer) -> None:
    # tiktoken panics (a BaseException) on such patterns; the wrapper must turn that into TokenizerError.
    with pytest.raises(TokenizerError, match="unusable"):
        Tokenizer(dict(tok.mergeable_ranks), r"\p{L}*", {EOT: 299})


def test_special_id_colliding_with_rank(saved_dir: Path) -> None:
    _write_meta(saved_dir, special_tokens={EOT: 42})
    with pytest.raises(TokenizerError, match="id 42, which is already the rank of mergeable token b'\\*'"):
        Tokenizer.from_dir(saved_dir)


def test_special_ids_colliding_with_each_other(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="share id 299"):
        Tokenizer(dict(tok.mergeable_ranks), GPT2_PATTERN, {EOT: 299, "<|other|>": 299})


def test_duplicate_rank_in_constructor(tok: Tokenizer) -> None:
    ranks = dict(tok.mergeable_ranks)
    ranks[b"zzz-new"] = 7
    with pytest.raises(TokenizerError, match="rank 7 is used by two tokens"):
        Tokenizer(ranks, GPT2_PATTERN, {})


@pytest.mark.parametrize(
    ("ranks_update", "specials", "match"),
    [
        ({b"": 400}, {}, "empty"),
        ({b"ab": -1}, {}, "must be in"),
        ({b"ab": 2**40}, {}, "must be in"),
        ({b"ab": 1.0}, {}, "must be an int"),
        ({}, {"": 400}, "non-empty str"),
        ({}, {EOT: -5}, "must be in"),
    ],
)
def test_invalid_constructor_ids(
    tok: Tokenizer, ranks_update: dict[bytes, object], specials: dict[str, int], match: str
) -> None:
    ranks = {**dict(tok.mergeable_ranks), **ranks_update}
    with pytest.raises(TokenizerError, match=match):
        Tokenizer(ranks, GPT2_PATTERN, specials)  # type: ignore[arg-type]


def test_missing_single_bytes(saved_dir: Path) -> None:
    path = saved_dir / RANKS_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    # Drop bytes 0x41 ('A') and 0xff.
    kept = [ln for ln in lines if ln.split()[0] not in (base64.b64encode(b"A"), base64.b64encode(b"\xff"))]
    assert len(kept) == len(lines) - 2
    path.write_bytes(b"".join(kept))
    with pytest.raises(TokenizerError, match=r"all 256 single bytes.*2 missing: 0x41, 0xff"):
        Tokenizer.from_dir(saved_dir)


def test_gaps_in_ids_are_allowed_but_not_decodable(tok: Tokenizer) -> None:
    ranks = dict(tok.mergeable_ranks)
    t = Tokenizer(ranks, GPT2_PATTERN, {EOT: 310})
    assert t.vocab_size == 311
    assert t.decode(t.encode("hi there")) == "hi there"
    with pytest.raises(TokenizerError, match="token id 305 is not assigned"):
        t.decode([104, 305])
    with pytest.raises(TokenizerError, match="token id 305 is not assigned"):
        t.token_bytes(305)


@pytest.mark.parametrize("bad", [300, 301, 10**6, 2**40, -1, -(2**40)])
def test_decode_out_of_range_id(tok: Tokenizer, bad: int) -> None:
    with pytest.raises(TokenizerError, match=f"token id {bad} is outside \\[0, 300\\)"):
        tok.decode([104, 105, bad])
    with pytest.raises(TokenizerError, match=f"token id {bad} is outside"):
        tok.decode_bytes([bad])
    with pytest.raises(TokenizerError, match=f"token id {bad} is outside"):
        tok.token_bytes(bad)


def test_errors_are_value_errors() -> None:
    assert issubclass(TokenizerError, ValueError)
