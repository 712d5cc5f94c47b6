"""Sampling a batch's next tokens, deciding when each request ends, and emitting its outputs."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from model.sampling import add_tokens, logprobs
from model.state import RetentionState
from server.engine.live import LiveRequest
from server.engine.sampling_rows import BatchSampling
from server.engine.types import RequestOutput, TokenLogprob, Usage


class Completions:
    """Samples tokens for rows, reports them, and finishes requests (engine thread only).

    `release(live)` is called once per request when its final output is emitted (the runner frees
    its queue entry and the engine's accounting).
    """

    def __init__(self, vocab_size: int, eos_id: int | None, release: Callable[[LiveRequest], None]) -> None:
        self.vocab = vocab_size
        self.eos = eos_id
        self.release = release
        self._sampling = BatchSampling()

    def _stop_ids(self, live: LiveRequest) -> list[int]:
        p = live.request.params
        ids = list(p.stop_token_ids)
        if self.eos is not None and not p.ignore_eos:
            ids.append(self.eos)
        return ids

    def _mask_early_stops(self, rows: list[LiveRequest], x: torch.Tensor) -> torch.Tensor:
        """`x` (B, V) with EOS / stop tokens at -inf for rows still under `min_tokens` (a copy if any)."""
        masked = x
        for i, live in enumerate(rows):
            stop_ids = self._stop_ids(live)
            if len(live.generated) < live.request.params.min_tokens and stop_ids:
                if masked is x:
                    masked = x.clone()
                masked[i, stop_ids] = -torch.inf
        return masked

    def sample_and_accept(self, rows: list[LiveRequest], logits: torch.Tensor) -> None:
        """Sample one token per row from `logits` (B, V) and take it (report, maybe finish)."""
        st = self._sampling.for_rows([live.sampling for live in rows])
        x = logits.float().cpu()  # (B, V)
        counts = None
        if st.needs_counts:
            zero = torch.zeros(self.vocab, dtype=torch.long)
            counts = torch.stack([zero if live.counts is None else live.counts for live in rows])  # (B, V)
        toks = st.sample(self._mask_early_stops(rows, x), counts)  # (B,)
        lp = None
        if any(live.request.params.logprobs for live in rows):
            lp = logprobs(x, toks, max(live.request.params.top_logprobs for live in rows))
        now = time.perf_counter()
        for i, live in enumerate(rows):
            tok = int(toks[i])
            if live.counts is not None:
                add_tokens(live.counts[None], toks[i : i + 1])
            if live.last_token_time is None:
                live.timings.ttft_s = now - live.timings.arrival
            else:
                live.timings.inter_token_s.append(now - live.last_token_time)
            live.last_token_time = now
            if lp is not None and live.request.params.logprobs:
                k = live.request.params.top_logprobs
                top = list(zip(lp[1][i, :k].tolist(), lp[2][i, :k].tolist(), strict=True))
                live.logprobs.append(TokenLogprob(tok, float(lp[0][i]), top))
            self._accept(live, tok)

    def _accept(self, live: LiveRequest, tok: int) -> None:
        p = live.request.params
        live.generated.append(tok)
        is_eos = tok == self.eos and not p.ignore_eos
        is_stop_tok = tok in p.stop_token_ids
        before = live.detok.num_reported
        ids, text, found = live.detok.add(tok, is_eos or is_stop_tok)
        if found:
            self._emit_delta(live, before, ids, text)
            self.finish(live, "stop", live.snapshots[live.detok.num_reported])
            return
        if is_eos or is_stop_tok:
            live.finish_reason, live.absorb_last = ("stop_token" if is_stop_tok else "eos"), True
        elif len(live.generated) >= p.max_tokens:
            more, tail = live.detok.flush()
            ids, text = ids + more, text + tail
            live.finish_reason, live.absorb_last = "length", True
        self._emit_delta(live, before, ids, text)
        for n in [n for n in live.snapshots if n < live.detok.num_reported]:
            del live.snapshots[n]

    def _emit_delta(self, live: LiveRequest, before: int, ids: list[int], text: str) -> None:
        if not ids and not text:
            return
        lps = live.logprobs[before : before + len(ids)] if live.request.params.logprobs else None
        live.emit(RequestOutput(live.request.request_id, ids, text, lps))

    def finish(
        self, live: LiveRequest, reason: str, final: tuple[RetentionState, torch.Tensor] | None
    ) -> None:
        """Emit the final output: `final` is (state, its next-token logits (V,)) or None (no state)."""
        live.finish_reason, live.absorb_last = reason, False
        state, logits = final if final is not None else (None, None)
        out = RequestOutput(
            live.request.request_id,
            [],
            live.detok.finish_text(),
            [] if live.request.params.logprobs else None,
            finished=True,
            finish_reason=reason,  # type: ignore[arg-type]
            usage=Usage(live.prompt_len, live.detok.num_reported, live.dropped),
            state=state,
            timings=live.timings,
            logits=None if logits is None else logits.to("cpu", torch.float32, copy=True),  # (V,)
        )
        live.snapshots.clear()
        live.emit(out)
        self.release(live)
