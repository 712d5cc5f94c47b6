"""Train the byte-level BPE with Hugging Face ``tokenizers``; ship it as a tiktoken ranks file.

``tokenizers`` is a training-time dependency only: the result is converted to tiktoken's format and
loaded at run time through ``model.tokenizer.Tokenizer`` (tiktoken alone).

Id layout (the ids are HF's own, so both encoders give identical ids):

* 0..255: the 256 single bytes, in the order of their GPT-2 ``bytes_to_unicode`` characters (not
  byte order: the byte ``a`` is id 64). Their order is irrelevant to BPE.
* 256..V-n-1: the merged tokens, in merge order, so a token's id is also its merge rank.
* V-n..V-1: the ``n`` special tokens (``<|endoftext|>`` = V-1 by default), added to the HF
  tokenizer after training so that they take the last ids rather than id 0.

tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF applies its merge
list in order. ``check_bpe_equivalence`` proves the two agree on every input (see its docstring),
and ``verify_round_trip`` checks it on held-out text.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from model.tokenizer import GPT2_PATTERN, Tokenizer

EOT = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
REPORT_FILE = "tokenizer_report.json"
TRAIN_FILE = "train.jsonl"
VAL_FILE = "val.jsonl"
N_BYTES = 256

# Strings whose GPT-2 pre-tokenisation is easy to get wrong; HF's split must equal tiktoken's.
SPLIT_PROBES: tuple[str, ...] = (
    "I'm sure you're right: we'll see, they've said it's 'S 'LL don't",
    "a  b   c    d\te\t\tf  \n g\n\n\nh \n\n i  ",
    "   leading and trailing   ",
    "x\r\ny\r\n\r\n  z\u00a0w \u3000v\u2028u\x85t\x0bs\x0cr",
    "2024-01-02 3.14159 1,000,000 x86_64 \u0663\u0664 \u00bd",
    "def f(x):\n    return x**2  # square\n\tpass\n",
    "caf\u00e9 cafe\u0301 na\u00efve \u4e2d\u6587\u5b57 \u65e5\u672c\u8a9e\u3067\u3059",
    "\U0001f600\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1fa\U0001f1f3!!",
    "<|endoftext|> foo<|endoftext|>bar \x00\x7f_ \ufeff\u200b",
)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class TokenizerTrainError(RuntimeError):
    """Tokenizer training, conversion or verification failed."""


# ---------------------------------------------------------------- byte <-> unicode


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table mapping each byte to the printable character HF's ByteLevel uses for it."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(N_BYTES):
        if b not in bs:
            bs.append(b)
            cs.append(N_BYTES + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in bytes_to_unicode().items()}


def token_str_to_bytes(token: str) -> bytes:
    """An HF byte-level vocabulary string -> the raw bytes it stands for."""
    try:
        return bytes(_UNICODE_TO_BYTE[c] for c in token)
    except KeyError as e:
        raise TokenizerTrainError(
            f"token {token!r} has character {e.args[0]!r} outside the byte alphabet"
        ) from None


def clean_text(text: str) -> str:
    """Lone surrogates (not UTF-8 encodable) -> U+FFFD, as tiktoken does; other text unchanged."""
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)
    return text


# ---------------------------------------------------------------- training


def build_hf_tokenizer(pattern: str = GPT2_PATTERN) -> tokenizers.Tokenizer:
    """An untrained HF byte-level BPE whose pre-tokenisation equals tiktoken's with ``pattern``.

    ``ignore_merges=True`` makes HF take a whole pre-tokenised piece that is itself a token as one
    token, as tiktoken does.
    """
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None, ignore_merges=True, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _checked_specials(special_tokens: Sequence[str], eos_token: str | None) -> list[str]:
    if isinstance(special_tokens, str):
        raise TypeError("special_tokens must be a sequence of str, not a str")
    specials = list(special_tokens)
    for s in specials:
        if not isinstance(s, str) or not s:
            raise ValueError(f"special token {s!r} must be a non-empty str")
    if len(set(specials)) != len(specials):
        raise ValueError(f"special tokens {specials} contain duplicates")
    if eos_token is not None and eos_token not in specials:
        raise ValueError(f"eos_token {eos_token!r} is not among special_tokens {specials}")
    return specials


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    special_tokens: Sequence[str] = (EOT,),
    min_frequency: int = 2,
    show_progress: bool = True,
    *,
    eos_token: str | None = EOT,
    name: str = "retserve-bpe",
) -> tuple[tokenizers.Tokenizer, Tokenizer]:
    """Train a byte-level BPE on ``texts``; return (HF tokenizer, equivalent tiktoken ``Tokenizer``).

    The vocabulary has exactly ``vocab_size`` ids, special tokens included; they take the last ids
    (``vocab_size - len(special_tokens)`` ...). Raises ``TokenizerTrainError`` when the text is too
    small to learn that many merges at ``min_frequency``.
    """
    specials = _checked_specials(special_tokens, eos_token)
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, int)
        or vocab_size - len(specials) < N_BYTES
    ):
        raise ValueError(
            f"vocab_size must be an int >= {N_BYTES} + {len(specials)} special token(s), got {vocab_size!r}"
        )
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of str, not a str")
    n_model = vocab_size - len(specials)

    hf_tok = build_hf_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=n_model,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf_tok.train_from_iterator((clean_text(t) for t in texts), trainer=trainer)
    learned = hf_tok.get_vocab_size(with_added_tokens=False)
    if learned != n_model:
        raise TokenizerTrainError(
            f"the training text yields only {learned - N_BYTES} merges with min_frequency={min_frequency}, "
            f"but vocab_size={vocab_size} needs {n_model - N_BYTES}: give more text or lower vocab_size"
        )
    hf_tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for i, s in enumerate(specials):
        if hf_tok.token_to_id(s) != n_model + i:
            raise TokenizerTrainError(
                f"special token {s!r} got id {hf_tok.token_to_id(s)}, expected {n_model + i}"
            )
    check_pre_tokenizer(hf_tok)
    return hf_tok, hf_to_tiktoken(hf_tok, eos_token=eos_token, name=name)


# ---------------------------------------------------------------- conversion


def _model_json(hf_tok: tokenizers.Tokenizer) -> dict[str, Any]:
    model = json.loads(hf_tok.to_str())["model"]
    if model.get("type") != "BPE":
        raise TokenizerTrainError(f"expected a BPE model, got {model.get('type')!r}")
    fixed = {"ignore_merges": True, "byte_fallback": False, "dropout": None}
    fixed |= {"continuing_subword_prefix": None, "end_of_word_suffix": None}
    for key, want in fixed.items():
        if model.get(key) != want:
            raise TokenizerTrainError(
                f"BPE {key}={model.get(key)!r} cannot be expressed in tiktoken (need {want!r})"
            )
    return model


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for m in model["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m  # older files store "a b"
        out.append((a, b))
    return out


def check_bpe_equivalence(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> None:
    """Raise ``TokenizerTrainError`` unless tiktoken with ranks = ids encodes exactly like HF's BPE.

    Two conditions suffice (with whole-piece lookup on both sides, i.e. ``ignore_merges``):

    A. every merge creates a new token, with ids increasing in merge order, and every non-byte token
       comes from a merge, so ordering pairs by the id of their concatenation is HF's merge order;
    B. HF's merges alone turn each token's own bytes into that token. tiktoken also merges a pair
       (x, y) that is no HF merge when x + y is a token; were x and y ever adjacent while encoding
       some text, they would also be when encoding x + y alone (a token only grows from bytes in its
       own span), and HF would stop at [x, y]. So B rules such pairs out.
    """
    seen: dict[str, int] = {}
    prev_id = -1
    for i, (a, b) in enumerate(merges):
        t = a + b
        for part in (a, b, t):
            if part not in vocab:
                raise TokenizerTrainError(
                    f"merge {i} ({a!r}, {b!r}) uses {part!r}, which is not in the vocab"
                )
        if t in seen:
            raise TokenizerTrainError(
                f"token {t!r} is created by two merges ({seen[t]} and {i}); tiktoken ranks cannot express "
                "that: retrain with different data or vocab_size"
            )
        if vocab[t] <= prev_id:
            raise TokenizerTrainError(
                f"merge {i} creates {t!r} with id {vocab[t]} <= previous merge's {prev_id}"
            )
        seen[t] = i
        prev_id = vocab[t]
    if len(vocab) != N_BYTES + len(merges):
        raise TokenizerTrainError(
            f"vocab has {len(vocab)} tokens, not {N_BYTES} bytes + {len(merges)} merges; "
            "some token comes from no merge"
        )
    plain = models.BPE(vocab=dict(vocab), merges=list(merges), ignore_merges=False)
    bad = [t for t in seen if [x.value for x in plain.tokenize(t)] != [t]]
    if bad:
        shown = ", ".join(repr(token_str_to_bytes(t)) for t in bad[:8])
        raise TokenizerTrainError(
            f"{len(bad)} token(s) are not rebuilt from their own bytes by the merges (e.g. {shown}); "
            "tiktoken would merge them where HF does not"
        )


def hf_to_tiktoken(
    hf_tok: tokenizers.Tokenizer,
    eos_token: str | None = EOT,
    name: str = "retserve-bpe",
    pattern: str = GPT2_PATTERN,
) -> Tokenizer:
    """Convert a trained HF byte-level BPE to a tiktoken ``Tokenizer`` with the very same ids."""
    model = _model_json(hf_tok)
    vocab: dict[str, int] = model["vocab"]
    merges = _merges(model)
    ranks: dict[bytes, int] = {}
    for s, tid in vocab.items():
        ranks[token_str_to_bytes(s)] = tid
    missing = [b for b in range(N_BYTES) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerTrainError(f"the vocab lacks {len(missing)} single bytes, e.g. {bytes(missing[:8])!r}")
    check_bpe_equivalence(vocab, merges)
    specials = {t.content: tid for tid, t in hf_tok.get_added_tokens_decoder().items()}
    return Tokenizer(ranks, pattern, specials, eos_token=eos_token, name=name)


# ---------------------------------------------------------------- checks


def hf_pieces(hf_tok: tokenizers.Tokenizer, text: str) -> list[bytes]:
    """How HF's pre-tokenizer splits ``text``, as raw bytes."""
    return [token_str_to_bytes(s) for s, _ in hf_tok.pre_tokenizer.pre_tokenize_str(text)]


def tiktoken_pieces(text: str, pattern: str = GPT2_PATTERN, max_bytes: int = 512) -> list[bytes]:
    """How tiktoken's own regex splits ``text``: every substring is made a token, so each piece
    comes back whole (tiktoken looks a piece up before running BPE on it)."""
    data = text.encode("utf-8")
    if len(data) > max_bytes:
        raise ValueError(f"text is {len(data)} bytes; at most {max_bytes} (this probe is quadratic)")
    ranks = {bytes([b]): b for b in range(N_BYTES)}
    for i in range(len(data)):
        for j in range(i + 2, len(data) + 1):
            ranks.setdefault(data[i:j], len(ranks))
    probe = Tokenizer(ranks, pattern, {}, name="split-probe")
    return [probe.token_bytes(t) for t in probe.encode(text)]


def check_pre_tokenizer(
    hf_tok: tokenizers.Tokenizer, texts: Iterable[str] = SPLIT_PROBES, pattern: str = GPT2_PATTERN
) -> None:
    """Raise ``TokenizerTrainError`` if HF's pre-tokenizer splits any of ``texts`` unlike tiktoken."""
    for text in texts:
        hf, tk = hf_pieces(hf_tok, text), tiktoken_pieces(text, pattern)
        if hf != tk:
            k = next(
                (i for i, (x, y) in enumerate(zip(hf, tk, strict=False)) if x != y), min(len(hf), len(tk))
            )
            raise TokenizerTrainError(
                f"pre-tokenisation differs on {text!r} at piece {k}: "
                f"HF {hf[k : k + 3]} vs tiktoken {tk[k : k + 3]}"
            )


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(clean_text(t))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _mismatch(doc: int, text: str, hf_ids: list[int], tk_ids: list[int], tok: Tokenizer, what: str) -> str:
    k = next(
        (i for i, (x, y) in enumerate(zip(hf_ids, tk_ids, strict=False)) if x != y),
        min(len(hf_ids), len(tk_ids)),
    )
    at = len(tok.decode(tk_ids[:k]))
    return (
        f"{what}: held-out doc {doc} differs at token {k} (char ~{at}): HF {hf_ids[k : k + 6]} vs "
        f"tiktoken {tk_ids[k : k + 6]}; text there: {text[max(0, at - 20) : at + 40]!r}"
    )


def verify_round_trip(
    hf_tok: tokenizers.Tokenizer, tok: Tokenizer, texts: Iterable[str], batch_size: int = 256
) -> dict[str, Any]:
    """Check that ``tok`` gives HF's ids on every text and that ``tok.decode(tok.encode(t)) == t``.

    Special-token text is compared as ordinary text, and also (where present) as special tokens.
    Raises ``TokenizerTrainError`` on the first difference; returns stats.
    """
    special_strs = list(tok.special_tokens)
    docs = chars = n_bytes = n_tokens = with_special = 0
    prev_flag = hf_tok.encode_special_tokens
    try:
        for batch in _batches(texts, batch_size):
            hf_tok.encode_special_tokens = True  # special-token text -> ordinary tokens, like tok.encode
            hf_all = [e.ids for e in hf_tok.encode_batch(batch, add_special_tokens=False)]
            hf_tok.encode_special_tokens = False
            for i, (text, hf_ids, tk_ids) in enumerate(
                zip(batch, hf_all, tok.encode_batch(batch), strict=True)
            ):
                if hf_ids != tk_ids:
                    raise TokenizerTrainError(_mismatch(docs + i, text, hf_ids, tk_ids, tok, "ordinary text"))
                if tok.decode(tk_ids) != text:
                    raise TokenizerTrainError(f"held-out doc {docs + i}: decode(encode(text)) != text")
                if any(s in text for s in special_strs):
                    with_special += 1
                    hf_sp = hf_tok.encode(text, add_special_tokens=False).ids
                    tk_sp = tok.encode(text, allow_special=True)
                    if hf_sp != tk_sp:
                        raise TokenizerTrainError(
                            _mismatch(docs + i, text, hf_sp, tk_sp, tok, "special tokens")
                        )
                chars += len(text)
                n_bytes += len(text.encode("utf-8"))
                n_tokens += len(tk_ids)
            docs += len(batch)
    finally:
        hf_tok.encode_special_tokens = prev_flag
    if docs == 0:
        raise TokenizerTrainError("no held-out texts to verify the conversion on")
    return {
        "docs": docs,
        "chars": chars,
        "bytes": n_bytes,
        "tokens": n_tokens,
        "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4),
        "chars_per_token": round(chars / max(n_tokens, 1), 4),
        "docs_with_special_text": with_special,
    }


# ---------------------------------------------------------------- corpus


def iter_jsonl_texts(
    path: Path, max_chars: int | None = None, counts: dict[str, int] | None = None
) -> Iterator[str]:
    """Stream the ``"text"`` of each JSON line; stop after ``max_chars`` chars (the last doc cut).

    ``counts`` (if given) is updated with ``docs`` and ``chars`` as texts are yielded.
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive or None, got {max_chars}")
    counts = {} if counts is None else counts
    counts.update(docs=0, chars=0)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise TokenizerTrainError(f"{path}:{lineno}: not a UTF-8 JSON line: {e}") from None
            text = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise TokenizerTrainError(f'{path}:{lineno}: expected an object with a string "text"')
            if max_chars is not None and counts["chars"] + len(text) >= max_chars:
                text = text[: max_chars - counts["chars"]]
                counts["docs"] += 1
                counts["chars"] += len(text)
                yield text
                return
            counts["docs"] += 1
            counts["chars"] += len(text)
            yield text


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_tokenizer_from_corpus(
    corpus_dir: Path,
    out_dir: Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_chars: int | None = None,
    name: str = "retserve-bpe-8k",
    *,
    min_frequency: int = 2,
    max_verify_chars: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train on ``corpus_dir/train.jsonl``, verify on ``val.jsonl``, save to ``out_dir``.

    Writes ``tokenizer.tiktoken``, ``tokenizer_meta.json`` and ``tokenizer_report.json``; returns the
    report.
    """
    t0 = time.perf_counter()
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    train_path, val_path = corpus_dir / TRAIN_FILE, corpus_dir / VAL_FILE
    for p in (train_path, val_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: a corpus directory holds {TRAIN_FILE} and {VAL_FILE}")
    train_counts: dict[str, int] = {}
    hf_tok, tok = train_bpe(
        iter_jsonl_texts(train_path, max_chars, train_counts),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        name=name,
    )
    t_train = time.perf_counter()
    round_trip = verify_round_trip(hf_tok, tok, iter_jsonl_texts(val_path, max_verify_chars))
    t_verify = time.perf_counter()

    tok.save(out_dir)
    reloaded = Tokenizer.from_dir(out_dir)
    if (dict(reloaded.mergeable_ranks), reloaded.special_tokens, reloaded.pattern, reloaded.eos_token) != (
        dict(tok.mergeable_ranks),
        tok.special_tokens,
        tok.pattern,
        tok.eos_token,
    ):
        raise TokenizerTrainError(f"the tokenizer saved in {out_dir} does not reload identically")
    report: dict[str, Any] = {
        "name": name,
        "vocab_size": tok.vocab_size,
        "n_merges": len(tok.mergeable_ranks) - N_BYTES,
        "special_tokens": tok.special_tokens,
        "eos_token": tok.eos_token,
        "eos_id": tok.eos_id,
        "pattern": tok.pattern,
        "min_frequency": min_frequency,
        "training": {"file": str(train_path), "max_chars": max_chars, **train_counts},
        "round_trip": {"file": str(val_path), "max_chars": max_verify_chars, **round_trip},
        "wall_time_s": {
            "train": round(t_train - t0, 3),
            "verify": round(t_verify - t_train, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
        "versions": {"tokenizers": tokenizers.__version__, "tiktoken": metadata.version("tiktoken")},
    }
    _write_json(out_dir / REPORT_FILE, report)
    return report
