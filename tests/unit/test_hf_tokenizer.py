"""The Hugging Face `tokenizer.json` backend on a Llama-style BPE trained here (byte fallback, metaspace).

Checked against the `tokenizers` library itself, for exact round trips on multilingual and emoji-heavy
text, and for incremental decoding by the engine's detokenizer equal to full decoding at every prefix.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer

from model.hf_tokenizer import HFTokenizer
from model.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from server.engine.detokenizer import Detokenizer
from tests.support.bpe import SAMPLE_TEXT
from tests.support.hf_model import build_hf_model

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "retserve-small"
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, two trailing  ",
    "tabs\tand\nnew\r\nlines\n\n",
    "中文和日本語のテキスト、한국어 텍스트",
    "Ελληνικά, Русский, العربية, हिन्दी, עברית",
    "e\u0301 combining, ﬁ ligature, \u200b zero width",
    "😀😃😄 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵🇫🇷 👍🏽 🧑🏿‍🚀 ✨🔥💯",
    "<s> and </s> and <unk> written in plain text",
    " ",
    "",
    SAMPLE_TEXT,
]
# Llama's tokenizer cannot tell a literal "▁" from a space: decoding gives spaces, as `tokenizers` does.
METASPACE_TEXT = "▁ a literal metaspace ▁▁ char"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_model(tmp_path_factory.mktemp("hf") / "m")


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> HFTokenizer:
    t = load_tokenizer(model_dir)
    assert isinstance(t, HFTokenizer)
    return t


@pytest.fixture(scope="module")
def rust(model_dir: Path) -> RustTokenizer:
    return RustTokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact_and_matches_tokenizers(tok: HFTokenizer, rust: RustTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == rust.decode(ids, skip_special_tokens=False)
    if "<" not in text:  # special-token text: `tokenizers` makes it a token, we keep it text
        assert ids == rust.encode(text, add_special_tokens=False).ids


def test_a_literal_metaspace_decodes_as_tokenizers_does(tok: HFTokenizer, rust: RustTokenizer) -> None:
    ids = tok.encode(METASPACE_TEXT)
    assert tok.decode(ids) == rust.decode(ids) == METASPACE_TEXT.replace("▁", " ")


def test_byte_fallback_metaspace_and_specials(tok: HFTokenizer) -> None:
    emoji = tok.encode("😀")
    assert emoji[0] == tok.encode(" ")[0]  # the metaspace prefix "▁"
    assert emoji[1:] == [3 + b for b in "😀".encode()]  # <0xF0> <0x9F> <0x98> <0x80>
    assert [tok.token_bytes(i) for i in emoji] == [b" ", b"\xf0", b"\x9f", b"\x98", b"\x80"]
    assert tok.strips_leading_space and tok.decode(tok.encode("x")) == "x"
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2} and tok.is_special(1)
    plain = tok.encode("<s>hi</s><unk>")
    assert not set(plain) & {0, 1, 2}  # special tokens never come from plain text
    assert tok.encode("<s>[INST] hi", allow_special=True)[0] == 1
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    assert tok.prompt_prefix == [1] and tok.prompt_suffix == []
    assert tok.vocab_size == 640


def test_add_bos_and_eos_come_from_tokenizer_config(model_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({**cfg, "add_bos_token": False, "add_eos_token": True})
    )
    t = HFTokenizer(tmp_path)
    assert t.prompt_prefix == [] and t.prompt_suffix == [2]
    unset = {k: v for k, v in cfg.items() if k not in ("add_bos_token", "add_eos_token")}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(unset))
    t = HFTokenizer(tmp_path)  # without the keys: what tokenizer.json's post-processor adds (<s> only)
    assert t.prompt_prefix == [1] and t.prompt_suffix == []
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": {"content": "<nope>"}}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json eos_token '<nope>' is not a token"):
        HFTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is not valid UTF-8 JSON"):
        HFTokenizer(tmp_path)


def _complete_prefix(data: bytes) -> str:
    """The text of `data` without an incomplete character at its end (what a stream may show)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        assert e.reason == "unexpected end of data", e
        return data[: e.start].decode("utf-8")


@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_incremental_decoding_equals_full_decoding_at_every_prefix(tok: HFTokenizer, text: str) -> None:
    ids = tok.encode(text)
    detok = Detokenizer(tok, [], strip_leading_space=True)
    shown = ""
    for k, tid in enumerate(ids, start=1):
        reported, delta, _ = detok.add(tid)
        assert reported == [tid]
        shown += delta
        assert shown == _complete_prefix(tok.decode_bytes(ids[:k]))
    assert shown + detok.finish_text() == tok.decode(ids) == text


def test_continuation_keeps_the_space(tok: HFTokenizer) -> None:
    # generated tokens continue a prompt: "▁world" after "Hello" is " world" (no strip by default)
    detok = Detokenizer(tok, [])
    text = "".join(detok.add(t)[1] for t in tok.encode(" world")[1:]) + detok.finish_text()
    assert text == " world"


def test_metaspace_pre_tokenizer_variant_matches_tokenizers(tmp_path: Path) -> None:
    d = build_hf_model(tmp_path / "m", legacy=False)
    tok, rust = load_tokenizer(d), RustTokenizer.from_file(str(d / "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == rust.encode(text, add_special_tokens=False).ids or "<" in text
        assert tok.decode(ids) == rust.decode(ids, skip_special_tokens=False)
        if not text.startswith(" "):  # prepend_scheme "first" folds one leading space into the prefix
            assert tok.decode(ids) == text


def test_load_tokenizer_picks_the_backend(model_dir: Path, tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(SHIPPED), Tokenizer)
    assert isinstance(load_tokenizer(model_dir), HFTokenizer)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(TokenizerError, match=r"no tokenizer.*tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_bad_ids_are_tokenizer_errors(tok: HFTokenizer) -> None:
    import numpy as np

    assert tok.token_bytes(np.int64(3)) == b"\x00"
    for bad in (-1, 640, 10**12, "3", 1.0):
        with pytest.raises(TokenizerError):
            tok.token_bytes(bad)  # type: ignore[arg-type]
    with pytest.raises(TokenizerError):
        tok.decode([5, 640])
