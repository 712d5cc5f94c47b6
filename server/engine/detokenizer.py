"""Incremental detokenisation and stop-string matching with hold-back, over bytes.

Which tokens are *reported* (the exact rule; the engine's final state absorbs exactly these):

- Every generated token goes into a pending list. Stop strings are matched on the UTF-8 bytes of the
  pending tokens (UTF-8 is self-synchronising, so a byte match is a character match, and partial
  multi-byte characters need no special care).
- A pending token is reported as soon as no stop string can start inside or before its bytes: i.e.
  every pending token that ends at or before the earliest offset whose suffix is a prefix of some
  stop string. Reported tokens are final: a later match can never start inside them.
- When a stop string occurs, the token holding its first byte is *cut*: it and every later token
  are neither reported nor absorbed; the pending tokens before it are reported. The bytes of the
  cut token before the stop string are dropped too, so the text always equals the decoding of the
  reported tokens.
- The first `min_tokens` tokens are reported at once and are not searched for stop strings.
- Stop tokens (EOS, `stop_token_ids`) are reported (they count as completion tokens and are
  absorbed) but their text is not emitted; they flush every pending token first.

Text deltas come from an incremental UTF-8 decoder over the reported bytes: an incomplete trailing
character is held back until its last byte arrives (and becomes U+FFFD only if the completion ends
on it), so a delta never splits a character.

Both tokenizer backends work: `token_bytes` is a token's bytes as a continuation (for a Llama-style
`tokenizer.json`, `▁` is a space and `<0xE2>` the byte 0xE2). With `strip_leading_space` (text read
from the start of a text, with a tokenizer whose decoder drops the space its `▁` prefix stands for) the
first character of the text is dropped when it is that space: the concatenated deltas are then always
`tokenizer.decode(reported ids)`, minus an incomplete character still held back.
"""

from __future__ import annotations

import codecs

from model.tokenizer import TextTokenizer


class LeadingSpace:
    """Drops the first character of a text given in pieces when it is a space (`active` only)."""

    def __init__(self, active: bool) -> None:
        self.pending = active

    def __call__(self, text: str) -> str:
        if self.pending and text:
            self.pending = False
            return text[1:] if text.startswith(" ") else text
        return text


class Detokenizer:
    """Per-request state: pending tokens, the stop strings and the incremental UTF-8 decoder."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        stop: list[str],
        min_tokens: int = 0,
        strip_leading_space: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = [s.encode("utf-8") for s in stop]
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.min_tokens = min_tokens
        self.pending: list[tuple[int, bytes]] = []
        self.num_seen = 0  # tokens given to `add`
        self.num_reported = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = LeadingSpace(strip_leading_space and tokenizer.strips_leading_space)

    def _emit(self, items: list[tuple[int, bytes]], final: bool = False) -> tuple[list[int], str]:
        text = self._strip(self._decoder.decode(b"".join(b for _, b in items), final=final))
        self.num_reported += len(items)
        return [t for t, _ in items], text

    def add(self, token_id: int, is_stop_token: bool = False) -> tuple[list[int], str, bool]:
        """Take one generated token: (newly reported ids, new text, stop string found)."""
        self.num_seen += 1
        if is_stop_token:
            items, self.pending = self.pending, []
            ids, text = self._emit(items)
            self.num_reported += 1
            return [*ids, token_id], text, False
        data = self.tokenizer.token_bytes(token_id)
        if not self.stops or self.num_seen <= self.min_tokens:
            return *self._emit([(token_id, data)]), False
        self.pending.append((token_id, data))
        buf = b"".join(b for _, b in self.pending)
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            cut = min(found)
        else:  # earliest offset whose suffix could still grow into a stop string
            cut = len(buf)
            for j in range(max(0, len(buf) - self.max_stop + 1), len(buf)):
                tail = buf[j:]
                if any(s.startswith(tail) for s in self.stops):
                    cut = j
                    break
        end, n = 0, 0
        for _, b in self.pending:
            if end + len(b) > cut:
                break
            end += len(b)
            n += 1
        items, self.pending = self.pending[:n], self.pending[n:]
        ids, text = self._emit(items)
        return ids, text, bool(found)

    def flush(self) -> tuple[list[int], str]:
        """Report every pending token (the completion ended for another reason than a stop string)."""
        items, self.pending = self.pending, []
        return self._emit(items, final=True)

    def finish_text(self) -> str:
        """Any held-back incomplete character at the very end (as U+FFFD); drops pending tokens."""
        self.pending = []
        return self._strip(self._decoder.decode(b"", final=True))
