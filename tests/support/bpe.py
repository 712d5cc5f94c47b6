"""A tiny byte-level BPE learned in pure Python from a built-in sample, for tests.

``make_test_tokenizer(vocab_size)`` gives a ``Tokenizer`` whose ranks 0..255 are the single bytes in
byte order, followed by the learned merges in order, followed by ``<|endoftext|>`` (so its
``vocab_size`` is exactly the one asked for).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter

from model.tokenizer import GPT2_PATTERN, Tokenizer

EOT = "<|endoftext|>"

SAMPLE_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs
into the forest. It's a small story, but it's ours: we'll tell it again and again, because
they're fond of it and I've never heard a better one.

Recurrent networks keep a state; retention networks keep a state too. A state that can be
saved, restored and resumed lets a server continue a conversation without reading the whole
history again. Serving models well means batching requests, streaming tokens, and keeping
memory under control. In 2024 there were 365 days; in 2025 there are 365 as well.

def main(argv: list[str]) -> int:
    for i in range(10):
        print(f"step {i}: loss={0.5 / (i + 1):.3f}")
    return 0

Les élèves étudient la théorie à l'école; après les cours, ils mangent des crêpes.
Der Bär läuft über die Straße, und die Größe der Häuser überrascht ihn.
Быстрая коричневая лиса прыгает через ленивую собаку.
Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.
敏捷的棕色狐狸跳过了懒狗。我们今天学习中文和日本語。東京は大きい都市です。
빠른 갈색 여우가 게으른 개를 뛰어넘는다.
الثعلب البني السريع يقفز فوق الكلب الكسول.
השועל החום המהיר קופץ מעל הכלב העצלן.
तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।
Emoji: 😀 😃 😄 👍🏽 👨‍👩‍👧‍👦 🇺🇳 ❤️ 🚀✨ — and combining marks: é ñ ạ̈ Z̤͔ͧ̑̓.
"""

# GPT-2's pattern in stdlib ``re`` (no \\p{..}): close enough for learning merges, since tiktoken
# applies the learned ranks with the real pattern anyway.
_APPROX_GPT2_RE = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def learn_bpe_ranks(text: str, n_merges: int) -> dict[bytes, int]:
    """Byte-level BPE: ranks 0..255 are single bytes, then ``n_merges`` merges in learned order."""
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    words: Counter[tuple[bytes, ...]] = Counter(
        tuple(bytes([b]) for b in piece.encode("utf-8")) for piece in _APPROX_GPT2_RE.findall(text)
    )
    while len(ranks) < 256 + n_merges:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            raise ValueError(f"sample text supports only {len(ranks) - 256} merges, asked for {n_merges}")
        # Most frequent pair; ties broken by the pair's bytes so the result is deterministic.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        if merged not in ranks:
            ranks[merged] = len(ranks)
        new_words: Counter[tuple[bytes, ...]] = Counter()
        for word, count in words.items():
            out: list[bytes] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return ranks


@functools.lru_cache(maxsize=8)
def make_test_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A Tokenizer of exactly ``vocab_size`` ids: 256 bytes + merges + ``<|endoftext|>`` (also eos)."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOT}), got {vocab_size}")
    ranks = learn_bpe_ranks(SAMPLE_TEXT, vocab_size - 257)
    return Tokenizer(
        ranks,
        GPT2_PATTERN,
        {EOT: len(ranks)},
        eos_token=EOT,
        name=f"retserve-test-bpe-{vocab_size}",
    )
