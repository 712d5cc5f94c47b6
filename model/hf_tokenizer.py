"""Hugging Face `tokenizer.json` tokenizers (run by the `tokenizers` library), beside the tiktoken one.

A model directory from the Hugging Face Hub (e.g. fla-hub's RetNets, which use Llama-2's tokenizer)
holds ``tokenizer.json`` and usually ``tokenizer_config.json`` (``add_bos_token``, ``add_eos_token``,
the special tokens, ``chat_template``) and ``special_tokens_map.json``. This backend gives them the
same interface as :class:`model.tokenizer.Tokenizer`:

* ``encode(text)`` is the text alone: no BOS/EOS (``prompt_prefix``/``prompt_suffix`` hold those, as
  ``add_bos_token``/``add_eos_token`` say), and special-token text in it is ordinary text unless
  ``allow_special`` (plain text never produces ``<s>``). The metaspace ``▁`` prefix is added exactly as
  the tokenizer's own normalizer / pre-tokenizer adds it.
* ``token_bytes(id)`` is a token's bytes as a *continuation* of earlier text: ``▁`` is a space and a
  byte-fallback token ``<0xE2>`` is the single byte 0xE2 (so a character split over several tokens is
  only whole once all of them arrived).
* ``decode(ids)`` is the text of ``ids`` read from the start of a text: the bytes joined and, when the
  decoder strips the prefix space the encoder adds (Llama's ``Strip`` / ``Metaspace`` decoders), one
  leading space removed. It equals the ``tokenizers`` decoder's output (checked at load on a probe).
"""

from __future__ import annotations

import json
import operator
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from model.tokenizer import TokenizerError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_PROBE_TEXT = (
    "Hello, world!  It's 2024 -- spaces\tand\nnewlines\r\n \u00e9\u0301 \u4e2d\u6587 "
    "\u0645\u0631\u062d\u0628\u0627 \U0001f600\u200d\U0001f680 end "
)


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path} is missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any, where: str) -> str | None:
    """A special-token entry: a string, an AddedToken dict ({"content": ...}) or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where} must be a string, an object with 'content', or null; got {value!r}")


def _decoder_kind(decoder: Any) -> tuple[str, str, bool]:
    """(family, space replacement char, strips one leading space) of a tokenizer.json decoder."""
    if not isinstance(decoder, dict):
        raise TokenizerError(
            "tokenizer.json has no decoder; only metaspace and byte-level ones are supported"
        )
    kind = decoder.get("type")
    if kind == "ByteLevel":
        return "bytelevel", "", False
    if kind == "Metaspace":
        scheme = decoder.get("prepend_scheme", "always" if decoder.get("add_prefix_space", True) else "never")
        return "metaspace", decoder.get("replacement", "\u2581"), scheme != "never"
    if kind == "Sequence":
        parts = decoder.get("decoders") or []
        types = [p.get("type") for p in parts if isinstance(p, dict)]
        if "ByteLevel" in types:
            return "bytelevel", "", False
        for p in parts:
            if p.get("type") == "Metaspace":
                return _decoder_kind(p)
        replace = next((p for p in parts if p.get("type") == "Replace"), None)
        if replace is not None:
            pattern = replace.get("pattern", {})
            space = pattern.get("String") if isinstance(pattern, dict) else None
            strip = any(
                p.get("type") == "Strip" and p.get("content") == " " and p.get("start", 0) >= 1 for p in parts
            )
            if isinstance(space, str) and replace.get("content") == " ":
                return "metaspace", space, strip
    raise TokenizerError(
        f"tokenizer.json decoder {json.dumps(decoder)[:200]} is not supported "
        "(supported: Llama-style metaspace with byte fallback, and byte-level BPE)"
    )


class HFTokenizer:
    """A `tokenizer.json` tokenizer with the interface of :class:`model.tokenizer.Tokenizer`."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        path = d / TOKENIZER_FILE
        raw = _read_json(path, required=True)
        try:
            self._tok = RustTokenizer.from_str(json.dumps(raw))
            self._plain = RustTokenizer.from_str(json.dumps(raw))
        except Exception as e:  # the Rust side raises a plain Exception for every malformed field
            raise TokenizerError(
                f"{path} is not a tokenizer the `tokenizers` library can load: {e}"
            ) from None
        self._plain.encode_special_tokens = True  # special-token text in plain text stays text
        cfg = _read_json(d / CONFIG_FILE, required=False)
        smap = _read_json(d / SPECIAL_MAP_FILE, required=False)
        self.config = cfg
        self._family, space, self._strip = _decoder_kind(raw.get("decoder"))
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._specials = {added[i].content: i for i in sorted(self._special_ids)}
        self._table = self._byte_table(space, added)
        roles: dict[str, str | None] = {}
        for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
            where = f"{d / CONFIG_FILE} {role}" if role in cfg else f"{d / SPECIAL_MAP_FILE} {role}"
            text = _token_text(cfg.get(role, smap.get(role)), where)
            if text is not None and self._tok.token_to_id(text) is None:
                raise TokenizerError(f"{where} {text!r} is not a token of {path}")
            roles[role] = text
        self._roles = roles
        # tokenizer_config.json's add_bos_token / add_eos_token; without them, what tokenizer.json's
        # post-processor adds (as a transformers fast tokenizer does)
        framed = self._tok.encode("a", add_special_tokens=True).ids
        bare = self._tok.encode("a", add_special_tokens=False).ids
        self.add_bos = self._adds(cfg.get("add_bos_token"), self.bos_id, framed[:1], bare[:1])
        self.add_eos = self._adds(cfg.get("add_eos_token"), self.eos_id, framed[-1:], bare[-1:])
        self._name = str(cfg.get("name_or_path") or cfg.get("tokenizer_class") or d.name)
        probe = self.encode(_PROBE_TEXT)
        ours, theirs = self.decode(probe), self._tok.decode(probe, skip_special_tokens=False)
        if ours != theirs:
            raise TokenizerError(
                f"{path}: decoding a probe text gives {theirs!r} with the tokenizer's decoder but "
                f"{ours!r} token by token; this decoder is not supported"
            )

    @staticmethod
    def _adds(setting: Any, token: int | None, framed_end: list[int], bare_end: list[int]) -> bool:
        if token is None:
            return False
        return bool(setting) if setting is not None else framed_end == [token] != bare_end

    def _byte_table(self, space: str, added: Mapping[int, Any]) -> list[bytes]:
        inverse = _bytes_to_unicode() if self._family == "bytelevel" else {}
        table: list[bytes] = []
        for i in range(self._vocab_size):
            if i in added:
                table.append(added[i].content.encode("utf-8"))
                continue
            piece = self._tok.id_to_token(i)
            if piece is None:
                table.append(b"")
            elif self._family == "bytelevel":
                table.append(bytes(inverse.get(c, 0x3F) for c in piece))
            elif m := _BYTE_TOKEN.fullmatch(piece):
                table.append(bytes([int(m.group(1), 16)]))
            else:
                table.append(piece.replace(space, " ").encode("utf-8"))
        return table

    # ---------------------------------------------------------------- properties

    @property
    def name(self) -> str:
        return self._name

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    @property
    def strips_leading_space(self) -> bool:
        """Whether text read from its start loses the one space the encoder's `▁` prefix stands for."""
        return self._strip

    def _role_id(self, role: str) -> int | None:
        text = self._roles[role]
        return None if text is None else self._tok.token_to_id(text)

    eos_token = property(lambda self: self._roles["eos_token"])
    bos_token = property(lambda self: self._roles["bos_token"])
    pad_token = property(lambda self: self._roles["pad_token"])
    unk_token = property(lambda self: self._roles["unk_token"])
    eos_id = property(lambda self: self._role_id("eos_token"))
    bos_id = property(lambda self: self._role_id("bos_token"))
    pad_id = property(lambda self: self._role_id("pad_token"))

    @property
    def prompt_prefix(self) -> list[int]:
        """Ids put before a new text (`add_bos_token`)."""
        return [self.bos_id] if self.add_bos and self.bos_id is not None else []

    @property
    def prompt_suffix(self) -> list[int]:
        """Ids put after a text (`add_eos_token`; training data, not prompts)."""
        return [self.eos_id] if self.add_eos and self.eos_id is not None else []

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self._name!r}, vocab_size={self._vocab_size}, eos={self.eos_token!r})"

    # ---------------------------------------------------------------- encoding / decoding

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids, without BOS/EOS. Special-token text is plain text unless `allow_special`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        tok = self._tok if allow_special else self._plain
        try:
            return tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # e.g. lone surrogates the Rust side cannot take
            raise TokenizerError(f"the tokenizer could not encode the text: {e}") from None

    def encode_batch(self, texts: Iterable[str], allow_special: bool = False) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch expects an iterable of str, not a str")
        return [self.encode(t, allow_special) for t in texts]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token as a continuation of earlier text (`▁` is a space)."""
        try:
            tid = operator.index(token_id)
        except TypeError:
            raise TokenizerError(f"token id {token_id!r} is not an integer") from None
        if not 0 <= tid < self._vocab_size:
            raise TokenizerError(f"token id {tid} is outside [0, {self._vocab_size})")
        return self._table[tid]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids read from the start of a text -> bytes (one leading space dropped, as the decoder does)."""
        data = b"".join(self.token_bytes(i) for i in ids)
        return data[1:] if self._strip and data.startswith(b" ") else data

    def decode(self, ids: Iterable[int]) -> str:
        """Ids read from the start of a text -> str; a cut multi-byte character becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
