"""Byte-level BPE tokenizer shipped inside a checkpoint directory, run by tiktoken; `load_tokenizer`
chooses it or the Hugging Face backend (model/hf_tokenizer.py) by what a model directory holds.

A checkpoint directory holds two files:

* ``tokenizer.tiktoken``: tiktoken's ranks format, one ``base64(token_bytes) rank`` line per token.
* ``tokenizer_meta.json``: ``{"format": "tiktoken", "version": 1, "pattern": ..., "special_tokens":
  {...}, "eos_token": ..., "bos_token": ..., "pad_token": ..., "name": ...}``.

Nothing is downloaded: the ranks are read from the directory and handed to ``tiktoken.Encoding``.
"""

from __future__ import annotations

import base64
import binascii
import json
import operator
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import tiktoken

RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer_meta.json"
FORMAT = "tiktoken"
VERSION = 1

# The pre-tokenisation regex of tiktoken's "gpt2" (r50k) encoding. Newer tiktoken releases spell it
# with possessive quantifiers (`\p{L}++`, `\s++$|...|\s`); the splits are the same.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# tiktoken stores token ids as u32 and uses u32::MAX as a sentinel; keep well clear of it.
MAX_TOKEN_ID = 2**31 - 1

_META_KEYS = ("format", "version", "pattern", "special_tokens", "eos_token", "bos_token", "pad_token", "name")
_REQUIRED_META_KEYS = ("format", "version", "pattern", "special_tokens")
_RANK_RE = re.compile(rb"[0-9]+")
# Round-tripped through the encoder at construction: catches patterns that drop or mangle text.
_PROBE_TEXT = (
    "Hello, world! It's 2024-01-02; we'll test  spaces\tand\nnewlines\r\n"
    "\u00e9\u0301 \u4e2d\u6587 \u0645\u0631\u062d\u0628\u0627 \U0001f600\u200d\U0001f680 \x00\x7f_ \ufeff"
)


class TokenizerError(ValueError):
    """Tokenizer files or arguments are malformed or inconsistent."""


def _is_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is a Rust panic surfaced by pyo3 (a BaseException, not an Exception)."""
    return type(exc).__name__ == "PanicException"


def _check_id(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenizerError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= value <= MAX_TOKEN_ID:
        raise TokenizerError(f"{what} must be in [0, {MAX_TOKEN_ID}], got {value}")
    return value


class Tokenizer:
    """A byte-level BPE (tiktoken) with named special tokens."""

    def __init__(
        self,
        mergeable_ranks: Mapping[bytes, int],
        pattern: str,
        special_tokens: Mapping[str, int],
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        name: str = "retserve-bpe",
    ) -> None:
        ranks = self._validate_ranks(mergeable_ranks)
        specials = self._validate_specials(special_tokens, ranks)
        if not isinstance(pattern, str) or not pattern:
            raise TokenizerError(f"pattern must be a non-empty str, got {pattern!r}")
        if not isinstance(name, str) or not name:
            raise TokenizerError(f"name must be a non-empty str, got {name!r}")
        for role, tok in (("eos_token", eos_token), ("bos_token", bos_token), ("pad_token", pad_token)):
            if tok is not None and tok not in specials:
                raise TokenizerError(f"{role} {tok!r} is not one of the special tokens {sorted(specials)}")

        self._ranks = ranks
        self._specials = specials
        self._pattern = pattern
        self._name = name
        self._eos_token = eos_token
        self._bos_token = bos_token
        self._pad_token = pad_token
        self._vocab_size = max(max(ranks.values()), max(specials.values(), default=-1)) + 1
        self._n_assigned = len(ranks) + len(specials)
        self._special_ids = frozenset(specials.values())

        try:
            self._enc = tiktoken.Encoding(
                name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
            )
        except ValueError as e:  # bad regex
            raise TokenizerError(f"invalid pre-tokenisation pattern {pattern!r}: {e}") from e
        try:
            probe_ok = self.decode(self._encode(_PROBE_TEXT, False)) == _PROBE_TEXT
        except TokenizerError as e:
            raise TokenizerError(f"pattern {pattern!r} is unusable: {e}") from e
        if not probe_ok:
            raise TokenizerError(
                f"pattern {pattern!r} does not split text into pieces that cover it: "
                "encoding drops or changes characters"
            )

    # ---------------------------------------------------------------- validation

    @staticmethod
    def _validate_ranks(mergeable_ranks: Mapping[bytes, int]) -> dict[bytes, int]:
        if not isinstance(mergeable_ranks, Mapping):
            raise TokenizerError(f"mergeable_ranks must be a mapping, got {type(mergeable_ranks).__name__}")
        ranks: dict[bytes, int] = {}
        by_id: dict[int, bytes] = {}
        for tok, rank in mergeable_ranks.items():
            if not isinstance(tok, bytes):
                raise TokenizerError(f"mergeable token {tok!r} must be bytes, got {type(tok).__name__}")
            if not tok:
                raise TokenizerError("mergeable token b'' (empty) is not allowed")
            _check_id(f"rank of token {tok!r}", rank)
            if rank in by_id:
                raise TokenizerError(f"rank {rank} is used by two tokens: {by_id[rank]!r} and {tok!r}")
            by_id[rank] = tok
            ranks[tok] = rank
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            shown = ", ".join(f"0x{b:02x}" for b in missing[:16]) + (", ..." if len(missing) > 16 else "")
            raise TokenizerError(
                f"byte-level BPE needs all 256 single bytes as tokens; {len(missing)} missing: {shown}"
            )
        return ranks

    @staticmethod
    def _validate_specials(special_tokens: Mapping[str, int], ranks: dict[bytes, int]) -> dict[str, int]:
        if not isinstance(special_tokens, Mapping):
            raise TokenizerError(f"special_tokens must be a mapping, got {type(special_tokens).__name__}")
        rank_to_tok = {r: t for t, r in ranks.items()}
        specials: dict[str, int] = {}
        seen: dict[int, str] = {}
        for tok, tid in special_tokens.items():
            if not isinstance(tok, str) or not tok:
                raise TokenizerError(f"special token {tok!r} must be a non-empty str")
            _check_id(f"id of special token {tok!r}", tid)
            if tid in rank_to_tok:
                raise TokenizerError(
                    f"special token {tok!r} has id {tid}, which is already the rank of "
                    f"mergeable token {rank_to_tok[tid]!r}"
                )
            if tid in seen:
                raise TokenizerError(f"special tokens {seen[tid]!r} and {tok!r} share id {tid}")
            seen[tid] = tok
            specials[tok] = tid
        return specials

    # ---------------------------------------------------------------- properties

    @property
    def name(self) -> str:
        return self._name

    @property
    def pattern(self) -> str:
        return self._pattern

    @property
    def mergeable_ranks(self) -> Mapping[bytes, int]:
        """Read-only view of the BPE ranks."""
        return MappingProxyType(self._ranks)

    @property
    def special_tokens(self) -> dict[str, int]:
        """A copy of the special-token table (text -> id)."""
        return dict(self._specials)

    @property
    def vocab_size(self) -> int:
        """Largest id (over ranks and special tokens) + 1."""
        return self._vocab_size

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def pad_token(self) -> str | None:
        return self._pad_token

    @property
    def eos_id(self) -> int | None:
        return None if self._eos_token is None else self._specials[self._eos_token]

    @property
    def prompt_prefix(self) -> list[int]:
        """Ids put before a new text: none (byte-level BPE models here are trained without BOS)."""
        return []

    @property
    def strips_leading_space(self) -> bool:
        """Byte-level BPE adds no prefix space, so decoding keeps every byte."""
        return False

    @property
    def bos_id(self) -> int | None:
        return None if self._bos_token is None else self._specials[self._bos_token]

    @property
    def pad_id(self) -> int | None:
        return None if self._pad_token is None else self._specials[self._pad_token]

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self._name!r}, vocab_size={self._vocab_size}, "
            f"specials={len(self._specials)}, eos={self._eos_token!r})"
        )

    # ---------------------------------------------------------------- encoding

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        try:
            if allow_special:
                return self._enc.encode(text, allowed_special="all")
            return self._enc.encode(text, allowed_special=set(), disallowed_special=())
        except BaseException as e:
            if _is_panic(e):
                raise TokenizerError(f"tiktoken failed to encode the text: {e}") from e
            raise

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token text becomes ordinary tokens unless ``allow_special``.

        Lone surrogates (not UTF-8 encodable) are encoded as U+FFFD, as tiktoken does.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._encode(text, allow_special)

    def encode_batch(self, texts: Iterable[str], allow_special: bool = False) -> list[list[int]]:
        """``encode`` over many texts (tiktoken runs them on a thread pool)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects an iterable of str, not a str")
        batch = list(texts)
        for i, t in enumerate(batch):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: item {i} is {type(t).__name__}, not str")
        try:
            if allow_special:
                return self._enc.encode_batch(batch, allowed_special="all")
            return self._enc.encode_batch(batch, allowed_special=set(), disallowed_special=())
        except BaseException as e:
            if _is_panic(e):
                raise TokenizerError(f"tiktoken failed to encode the batch: {e}") from e
            raise

    # ---------------------------------------------------------------- decoding

    def _as_ids(self, ids: Iterable[int]) -> list[int]:
        out: list[int] = []
        for i in ids:
            try:
                tid = operator.index(i)
            except TypeError as e:
                raise TokenizerError(f"token id {i!r} is not an integer") from e
            out.append(tid)
        return out

    def _bad_id_error(self, tid: int) -> TokenizerError:
        if not 0 <= tid < self._vocab_size:
            return TokenizerError(f"token id {tid} is outside [0, {self._vocab_size})")
        return TokenizerError(f"token id {tid} is not assigned to any token (a gap in the vocabulary)")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the raw bytes they stand for (special tokens as their UTF-8 text)."""
        id_list = self._as_ids(ids)
        try:
            return self._enc.decode_bytes(id_list)
        except (KeyError, OverflowError):
            pass
        for tid in id_list:
            if not 0 <= tid < self._vocab_size or not self._is_assigned(tid):
                raise self._bad_id_error(tid) from None
        raise TokenizerError(f"tiktoken could not decode ids {id_list!r}")  # pragma: no cover

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token, for incremental detokenisation."""
        (tid,) = self._as_ids([token_id])
        try:
            return self._enc.decode_single_token_bytes(tid)
        except (KeyError, OverflowError):
            raise self._bad_id_error(tid) from None

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special token's id."""
        return token_id in self._special_ids

    def _is_assigned(self, tid: int) -> bool:
        if self._n_assigned == self._vocab_size:
            return True
        try:
            self._enc.decode_single_token_bytes(tid)
        except (KeyError, OverflowError):
            return False
        return True

    # ---------------------------------------------------------------- files

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load ``tokenizer.tiktoken`` + ``tokenizer_meta.json`` from a checkpoint directory."""
        d = Path(path)
        if not d.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory {str(d)!r} does not exist or is not a directory; it should "
                f"contain {RANKS_FILE} and {META_FILE}"
            )
        meta = _read_meta(d / META_FILE)
        ranks = _read_ranks(d / RANKS_FILE)
        try:
            return cls(
                ranks,
                meta["pattern"],
                meta["special_tokens"],
                eos_token=meta.get("eos_token"),
                bos_token=meta.get("bos_token"),
                pad_token=meta.get("pad_token"),
                name=meta.get("name", "retserve-bpe"),
            )
        except TokenizerError as e:
            raise TokenizerError(f"tokenizer in {str(d)!r}: {e}") from e

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write both tokenizer files into directory ``path`` (created if needed)."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        lines = b"".join(
            base64.b64encode(tok) + b" " + str(rank).encode() + b"\n"
            for tok, rank in sorted(self._ranks.items(), key=lambda kv: kv[1])
        )
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "pattern": self._pattern,
            "special_tokens": dict(sorted(self._specials.items(), key=lambda kv: kv[1])),
            "eos_token": self._eos_token,
            "bos_token": self._bos_token,
            "pad_token": self._pad_token,
            "name": self._name,
        }
        _atomic_write(d / RANKS_FILE, lines)
        _atomic_write(d / META_FILE, (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are shipped, world-readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_file(path: Path, should_contain: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"tokenizer file {str(path)!r} is missing; it should contain {should_contain}"
        ) from None


def _read_ranks(path: Path) -> dict[bytes, int]:
    """Parse tiktoken's ranks format strictly (line numbers in every error)."""
    data = _read_file(path, "the BPE ranks, one 'base64(token_bytes) rank' line per token")
    ranks: dict[bytes, int] = {}
    line_of_tok: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {lineno}"
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{where}: expected 'base64(token_bytes) rank', got {line[:80]!r}")
        b64, rank_s = parts
        try:
            tok = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise TokenizerError(f"{where}: token {b64[:80]!r} is not valid base64 ({e})") from None
        if not tok:
            raise TokenizerError(f"{where}: token is empty")
        if not _RANK_RE.fullmatch(rank_s):
            raise TokenizerError(f"{where}: rank {rank_s[:40]!r} is not a non-negative decimal integer")
        rank = int(rank_s)
        if rank > MAX_TOKEN_ID:
            raise TokenizerError(f"{where}: rank {rank} exceeds {MAX_TOKEN_ID}")
        if tok in line_of_tok:
            raise TokenizerError(f"{where}: token {tok!r} already appeared on line {line_of_tok[tok]}")
        if rank in line_of_rank:
            raise TokenizerError(f"{where}: rank {rank} already used on line {line_of_rank[rank]}")
        line_of_tok[tok] = lineno
        line_of_rank[rank] = lineno
        ranks[tok] = rank
    if not ranks:
        raise TokenizerError(f"{str(path)!r} holds no tokens")
    return ranks


def _read_meta(path: Path) -> dict[str, Any]:
    """Parse and type-check ``tokenizer_meta.json``."""
    data = _read_file(
        path,
        'a JSON object {"format": "tiktoken", "version": 1, "pattern": ..., "special_tokens": {...}, '
        '"eos_token": ..., "bos_token": ..., "pad_token": ..., "name": ...}',
    )
    where = repr(str(path))
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{where} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(meta, dict):
        raise TokenizerError(f"{where} must hold a JSON object, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(_META_KEYS))
    if unknown:
        raise TokenizerError(f"{where}: unknown keys {unknown}; allowed keys are {list(_META_KEYS)}")
    missing = [k for k in _REQUIRED_META_KEYS if k not in meta]
    if missing:
        raise TokenizerError(f"{where}: missing required keys {missing}")
    if meta["format"] != FORMAT:
        raise TokenizerError(f"{where}: format must be {FORMAT!r}, got {meta['format']!r}")
    if meta["version"] != VERSION or isinstance(meta["version"], bool):
        raise TokenizerError(
            f"{where}: unsupported version {meta['version']!r} (this reader knows {VERSION})"
        )
    if not isinstance(meta["pattern"], str) or not meta["pattern"]:
        raise TokenizerError(f"{where}: pattern must be a non-empty string, got {meta['pattern']!r}")
    specials = meta["special_tokens"]
    if not isinstance(specials, dict):
        raise TokenizerError(f"{where}: special_tokens must be an object, got {type(specials).__name__}")
    for tok, tid in specials.items():
        if isinstance(tid, bool) or not isinstance(tid, int):
            raise TokenizerError(f"{where}: special token {tok!r} must map to an integer id, got {tid!r}")
    for key in ("eos_token", "bos_token", "pad_token"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise TokenizerError(f"{where}: {key} must be a string or null, got {meta[key]!r}")
    if "name" in meta and not isinstance(meta["name"], str):
        raise TokenizerError(f"{where}: name must be a string, got {meta['name']!r}")
    return meta


class TextTokenizer(Protocol):
    """What the engine and server need from a tokenizer (tiktoken `Tokenizer` or `HFTokenizer`)."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_id(self) -> int | None: ...
    @property
    def bos_id(self) -> int | None: ...
    @property
    def prompt_prefix(self) -> list[int]: ...
    @property
    def strips_leading_space(self) -> bool: ...
    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...
    def is_special(self, token_id: int) -> bool: ...


def load_tokenizer(path: str | os.PathLike[str]) -> TextTokenizer:
    """The tokenizer of a model directory: `tokenizer.tiktoken` (+ meta) if present, else Hugging Face's
    `tokenizer.json` (fla-hub and other Hub checkpoints)."""
    d = Path(path)
    if (d / RANKS_FILE).is_file() or (d / META_FILE).is_file():
        return Tokenizer.from_dir(d)
    from model.hf_tokenizer import TOKENIZER_FILE, HFTokenizer

    if (d / TOKENIZER_FILE).is_file():
        return HFTokenizer(d)
    raise TokenizerError(
        f"{d} has no tokenizer: it needs {RANKS_FILE} + {META_FILE} (tiktoken) or {TOKENIZER_FILE} "
        "(Hugging Face); a sentencepiece tokenizer.model alone is not enough"
    )
