"""`retserve prime`: a 200 kB document read in pieces leaves the session with exactly the file's tokens
(the shipped tokenizer counts them here), progress shows on stderr, and an interrupted run resumes
without reading any piece twice."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from retserve_client.cli.pieces import split_pieces

from model.tokenizer import Tokenizer
from tests.support.cli import RETSERVE, json_out, retserve
from tests.support.server import run_server

ROOT = Path(__file__).resolve().parents[2]
WORDS = [
    *("the", "king", "and", "queen", "of", "Denmark", "walked", "slowly", "through", "a", "garden"),
    *("where", "nobody", "had", "been", "since", "winter", "ended", "while", "soldiers", "watched"),
]
ODD = [  # what a cut could get wrong: contractions, numbers, unicode, runs of spaces, tabs, newlines
    "don't", "we'll", "O'Brien", "42", "3.14", "1,000", "x²", "½", "—", "...", "!?", "(yes)", "café",
    "naïve", "日本語", "привет", "مرحبا", "🙂", "a\u00a0b", "<|endoftext|>", "\t", "  ", "   ", "\n",
    "\n\n", "e-mail", "https://x.y/z", "$5", "100%", "'quoted'", '"double"',
]  # fmt: skip


def document(n_bytes: int, seed: int = 0) -> str:
    """Deterministic English-like text with the odd cases above mixed in, `n_bytes` UTF-8 bytes or so."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        word = rng.choice(ODD) if rng.random() < 0.15 else rng.choice(WORDS)
        part = word + rng.choice([" ", " ", " ", " ", "  ", "\n", ", ", ". ", ""])
        parts.append(part)
        size += len(part.encode())
    return "".join(parts)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(ROOT / "checkpoints" / "retserve-small")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with run_server() as u:
        yield u


@pytest.fixture
def state_home(tmp_path: Path) -> dict[str, str]:
    """Keep the resume records of a test in its own folder."""
    return {"XDG_STATE_HOME": str(tmp_path / "state")}


def test_pieces_tokenize_as_the_whole_text(tokenizer: Tokenizer) -> None:
    text = document(60_000, seed=1)
    whole = tokenizer.encode(text)
    for target in (1, 7, 256, 1000, 16000):
        pieces = split_pieces(text, target)
        assert "".join(pieces) == text
        assert [t for p in pieces for t in tokenizer.encode(p)] == whole, target
        assert all(p.startswith(" ") for p in pieces[1:])
    naive = [text[i : i + 1000] for i in range(0, len(text), 1000)]  # why the rule matters
    assert [t for p in naive for t in tokenizer.encode(p)] != whole
    assert split_pieces("x" * 50, 10) == ["x" * 50]  # no place to cut: one piece
    assert split_pieces("", 10) == []
    with pytest.raises(ValueError):
        split_pieces("abc", 0)


def test_prime_200kb_file(url: str, tokenizer: Tokenizer, tmp_path: Path, state_home: dict) -> None:
    text = document(200_000)
    doc = tmp_path / "doc.txt"
    doc.write_text(text)
    assert 200_000 <= doc.stat().st_size < 201_000
    proc = retserve(url, "prime", str(doc), "--session", "doc", "--json", env=state_home)
    got = json_out(proc)
    assert (
        got["tokens"]
        == len(tokenizer.encode(text))
        == json_out(retserve(url, "sessions", "show", "doc", "--json"))["tokens"]
    )
    assert got["pieces"] == got["pieces_read"] == 13 and got["chars"] == len(text)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("prime: ")]
    assert len(lines) == 13 and all("tok/s" in line and "ETA" in line for line in lines), proc.stderr
    assert lines[-1].startswith(f"prime: {len(text):,}/{len(text):,} chars (100%), {got['tokens']:,} tokens")
    # run again: the record says everything was read; nothing is read twice
    again = json_out(retserve(url, "prime", str(doc), "--session", "doc", "--json", env=state_home))
    assert again["pieces_read"] == 0 and again["tokens"] == got["tokens"]
    # on a terminal the progress is a live bar
    small = tmp_path / "small.txt"
    small.write_text(text[:20_000])
    tty_env = {**state_home, "TTY_COMPATIBLE": "1"}
    tty = retserve(url, "prime", str(small), "--session", "doc-tty", "--chunk-chars", "4000", env=tty_env)
    assert tty.returncode == 0 and "100%" in tty.stderr and "tok/s" in tty.stderr and "\x1b[" in tty.stderr


def test_prime_resumes_after_an_interrupt(
    url: str, tokenizer: Tokenizer, tmp_path: Path, state_home: dict
) -> None:
    text = document(40_000, seed=2)
    doc = tmp_path / "doc.txt"
    doc.write_text(text)
    args = [str(RETSERVE), "--url", url, "prime", str(doc), "--session", "cut", "--chunk-chars", "1000"]
    proc = subprocess.Popen(
        args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **state_home}
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()
    assert first.startswith("prime: "), first
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.stdout is not None
    proc.stdout.close()
    assert proc.returncode == 130 and "interrupted" in err

    done = json_out(retserve(url, "prime", str(doc), "--session", "cut", "--json", env=state_home))
    assert (
        0 < done["resumed_at"] < done["pieces"] and done["pieces_read"] == done["pieces"] - done["resumed_at"]
    )
    assert done["tokens"] == len(tokenizer.encode(text))

    # a record left while a piece was in flight, whose read the server did save: not read again
    record = Path(done["progress_file"])
    rec = json.loads(record.read_text())
    last = split_pieces(text, rec["piece_chars"])[-1]
    in_flight = {"next": rec["pieces"] - 1, "reading": True, "version": rec["version"] - 1}
    record.write_text(json.dumps({**rec, **in_flight, "tokens": rec["tokens"] - len(tokenizer.encode(last))}))
    again = json_out(retserve(url, "prime", str(doc), "--session", "cut", "--json", env=state_home))
    assert again["pieces_read"] == 0 and again["tokens"] == done["tokens"]

    # the session changed since: refused (usage error), unless --restart
    assert retserve(url, "complete", " more", "--session", "cut", "-n", "1").returncode == 0
    changed = retserve(url, "prime", str(doc), "--session", "cut", env=state_home)
    assert changed.returncode == 2 and "--restart" in changed.stderr
