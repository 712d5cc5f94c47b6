"""Cutting a document into pieces whose tokens, read one after another, are the whole document's tokens.

A byte-level BPE never merges across its pre-tokens, so a cut must fall on a pre-token boundary that
the whole text has too. With the GPT-2 pre-tokenisation pattern of the shipped tokenizer
(`'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`), a single space with a
non-space on both sides always starts a pre-token (the space is the optional leading space of the
word, number or punctuation run after it), and nothing before it can reach past it. So pieces are
cut just before such a space: piece n+1 begins with " word". Each piece is about `target` characters
(the last cut at or before `target`, else the first one after it; text without any such space is one
piece). tests/e2e/test_cli_prime.py checks the rule against the shipped tokenizer.
"""

from __future__ import annotations

import re

CUT = re.compile(r"(?<=\S) (?=\S)")  # Python's \s covers Unicode White_Space (and a few more: safe)


def split_pieces(text: str, target: int) -> list[str]:
    """`text` in pieces of about `target` characters, cut only before a space between two non-spaces."""
    if target < 1:
        raise ValueError(f"target must be >= 1, got {target}")
    pieces: list[str] = []
    start = 0
    while len(text) - start > target:
        cut = _cut_near(text, start, start + target)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _cut_near(text: str, start: int, want: int) -> int | None:
    """The last cut in (start, want], else the first one after `want`; None if there is none."""
    best = None
    for m in CUT.finditer(text, start + 1, want + 2):  # endpos: the lookahead of a cut at `want`
        best = m.start()
    if best is not None:
        return best
    m = CUT.search(text, want + 1)
    return m.start() if m else None
