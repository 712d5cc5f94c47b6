"""One scheduler iteration: chunked prefill under a budget, one batched recurrent step, sampling.

How the last sampled token is absorbed (the final-state rule): a request's returned state has read
exactly its prompt plus the tokens reported to the client (`usage.completion_tokens`).

- A sampled token is fed to the model in the next batched recurrent step (that step's logits give
  the following token). When a request ends on a sampled token it keeps its row for that one more
  step (`final_feed`): the token is fed, the logits are ignored and the row leaves with its state.
  This covers "length", "eos" and "stop_token" and an abort after all tokens were reported.
- Tokens held back for stop strings (see `detokenizer`) may already be absorbed when a stop string
  cuts them; rows with stop strings therefore keep a snapshot of their state after each token
  until that token is reported, and a stop-string finish (or an abort that drops held-back
  tokens) returns the snapshot taken after the last reported token.
- An abort before the prompt was fully read returns no state (None).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from model.retnet import RetNet
from model.sampling import SamplingTensors, add_tokens, logprobs
from model.state import RetentionState
from model.tokenizer import Tokenizer
from server.engine.decode import DecodeStep
from server.engine.scheduler import Scheduler, Sequence
from server.engine.types import (
    EngineConfig,
    IterationStats,
    RequestOutput,
    TokenLogprob,
    Usage,
)


class Runner:
    """Owns the batched state of the running rows; every method runs on the engine thread."""

    def __init__(
        self,
        model: RetNet,
        tokenizer: Tokenizer,
        config: EngineConfig,
        on_prompt_read: Callable[[int], None] = lambda n: None,
        on_finished: Callable[[Sequence], None] = lambda s: None,
        after_prefill: Callable[[], None] = lambda: None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.sched = Scheduler(config)
        self.decode_step = DecodeStep.shared(model, config.compile, config.compile_buckets)
        self.batch_state: RetentionState | None = None  # rows = sched.running
        self.vocab = model.config.vocab_size
        self.eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_id
        self._st_key: tuple[int, ...] = ()
        self._st: SamplingTensors | None = None
        self.on_prompt_read = on_prompt_read
        self.on_finished = on_finished
        self.after_prefill = after_prefill  # deliver first tokens now, not after the decode step

    # ---- one iteration -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> IterationStats:
        t0 = time.perf_counter()
        self.sched.admit()
        plan = self.sched.plan_prefill()
        n_prefill = sum(e - s for _, s, e in plan)
        if plan:
            self._prefill(plan)
            self.after_prefill()
        t1 = time.perf_counter()
        rows = len(self.sched.running)
        if rows:
            self._decode()
        t2 = time.perf_counter()
        return IterationStats(n_prefill, len(plan), rows, t1 - t0, t2 - t1, t2 - t0)

    # ---- prefill -------------------------------------------------------------------------------
    def _prefill(self, plan: list[tuple[Sequence, int, int]]) -> None:
        t_start = time.perf_counter()
        n, T = len(plan), max(e - s for _, s, e in plan)
        ids = torch.zeros(n, T, dtype=torch.long)
        mask = torch.zeros(n, T, dtype=torch.long)
        keep = torch.ones(n, T, dtype=torch.bool)
        any_keep = False
        for i, (seq, s, e) in enumerate(plan):  # left padding: every row's last column is a token
            ids[i, T - (e - s) :] = torch.tensor(seq.request.prompt_ids[s:e], dtype=torch.long)
            mask[i, T - (e - s) :] = 1
            if seq.keep is not None:
                keep[i, T - (e - s) :] = seq.keep[s:e]
                any_keep = True
        states = [seq.state if seq.state is not None else self.model.empty_state(1) for seq, _, _ in plan]
        dev = self.model.device
        logits, new = self.model(
            ids.to(dev),
            RetentionState.stack(states),
            attention_mask=None if bool(mask.all()) else mask.to(dev),
            keep=keep.to(dev) if any_keep else None,
            mode="chunk",
            chunk_size=self.config.chunk_size,
            logits_to_keep=1,
        )
        now = time.perf_counter()
        done: list[int] = []
        for i, (seq, s, e) in enumerate(plan):
            if seq.prefill_start is None:
                seq.prefill_start = t_start
            seq.state = new.select([i])
            seq.prefilled = e
            self.on_prompt_read(e - s)
            if e == seq.prompt_len:
                seq.timings.prefill_s = now - seq.prefill_start
                done.append(i)
        if not done:
            return
        finished = [plan[i][0] for i in done]
        for seq in finished:
            self.sched.prefilling.remove(seq)
        joining = []
        for seq in finished:
            if seq.request.params.max_tokens == 0:
                self._finalize(seq, "length", seq.state)
            else:
                joining.append(seq)
        if not joining:
            return
        first = logits[[i for i in done if plan[i][0] in joining], -1]  # (k, V)
        for seq in joining:
            if seq.request.params.stop:
                seq.snapshots[0] = seq.state
        new_state = RetentionState.stack([seq.state for seq in joining])
        for seq in joining:
            seq.state = None
        self.sched.running.extend(joining)
        old = self.batch_state
        self.batch_state = new_state if old is None else RetentionState.stack([old, new_state])
        self._sample_and_accept(joining, first)
        self._compact()

    # ---- decode --------------------------------------------------------------------------------
    def _decode(self) -> None:
        running = self.sched.running
        assert self.batch_state is not None
        toks = torch.tensor([[seq.generated[-1]] for seq in running], dtype=torch.long)  # (B, 1)
        logits, self.batch_state = self.decode_step(toks.to(self.model.device), self.batch_state)  # (B, V)
        sample_rows: list[int] = []
        for i, seq in enumerate(running):
            seq.absorbed += 1
            if seq.final_feed:
                self._finalize(seq, seq.finishing or "length", self.batch_state.select([i]))
                continue
            if seq.request.params.stop:
                seq.snapshots[seq.absorbed] = self.batch_state.select([i])
            sample_rows.append(i)
        if sample_rows:
            self._sample_and_accept([running[i] for i in sample_rows], logits[sample_rows])
        self._compact()

    def _compact(self) -> None:
        """Drop finished rows from the batch (one `select` when membership shrinks)."""
        running = self.sched.running
        keep = [i for i, seq in enumerate(running) if seq.finishing is None or seq.final_feed]
        if len(keep) == len(running):
            return
        self.sched.running = [running[i] for i in keep]
        self.batch_state = self.batch_state.select(keep) if keep and self.batch_state is not None else None

    # ---- sampling ------------------------------------------------------------------------------
    def _tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        key = tuple(id(s) for s in seqs)
        if key != self._st_key or self._st is None:
            self._st = SamplingTensors.from_params(
                [s.request.params for s in seqs], self.vocab, generators=[s.generator for s in seqs]
            )
            self._st_key = key
        return self._st

    def _stop_ids(self, seq: Sequence) -> list[int]:
        p = seq.request.params
        ids = list(p.stop_token_ids)
        if self.eos is not None and not p.ignore_eos:
            ids.append(self.eos)
        return ids

    def _sample_and_accept(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        st = self._tensors(seqs)
        x = logits.float().cpu()  # (B, V)
        masked = x
        for i, seq in enumerate(seqs):
            if len(seq.generated) < seq.request.params.min_tokens and self._stop_ids(seq):
                if masked is x:
                    masked = x.clone()
                masked[i, self._stop_ids(seq)] = -torch.inf
        counts = None
        if st.needs_counts:
            zero = torch.zeros(self.vocab, dtype=torch.long)
            counts = torch.stack([s.counts if s.counts is not None else zero for s in seqs])
        toks = st.sample(masked, counts)  # (B,)
        top_n = max(s.request.params.top_logprobs for s in seqs)
        lp = None
        if any(s.request.params.logprobs for s in seqs):
            lp = logprobs(x, toks, top_n)
        now = time.perf_counter()
        for i, seq in enumerate(seqs):
            tok = int(toks[i])
            if seq.counts is not None:
                add_tokens(seq.counts[None], toks[i : i + 1])
            if seq.last_token_time is None:
                seq.timings.ttft_s = now - seq.timings.arrival
            else:
                seq.timings.inter_token_s.append(now - seq.last_token_time)
            seq.last_token_time = now
            if lp is not None and seq.request.params.logprobs:
                k = seq.request.params.top_logprobs
                top = list(zip(lp[1][i, :k].tolist(), lp[2][i, :k].tolist(), strict=True))
                seq.logprobs.append(TokenLogprob(tok, float(lp[0][i]), top))
            self._accept(seq, tok)

    def _accept(self, seq: Sequence, tok: int) -> None:
        p = seq.request.params
        seq.generated.append(tok)
        is_eos = tok == self.eos and not p.ignore_eos
        is_stop_tok = tok in p.stop_token_ids
        before = seq.detok.num_reported
        ids, text, found = seq.detok.add(tok, is_eos or is_stop_tok)
        if found:
            self._emit_delta(seq, before, ids, text)
            self._finalize(seq, "stop", seq.snapshots[seq.detok.num_reported])
            return
        if is_eos or is_stop_tok:
            seq.finishing, seq.final_feed = ("stop_token" if is_stop_tok else "eos"), True
        elif len(seq.generated) >= p.max_tokens:
            more, tail = seq.detok.flush()
            ids, text = ids + more, text + tail
            seq.finishing, seq.final_feed = "length", True
        self._emit_delta(seq, before, ids, text)
        for n in [n for n in seq.snapshots if n < seq.detok.num_reported]:
            del seq.snapshots[n]

    # ---- outputs -------------------------------------------------------------------------------
    def _emit_delta(self, seq: Sequence, before: int, ids: list[int], text: str) -> None:
        if not ids and not text:
            return
        lps = seq.logprobs[before : before + len(ids)] if seq.request.params.logprobs else None
        seq.emit(RequestOutput(seq.request.request_id, ids, text, lps))

    def _finalize(self, seq: Sequence, reason: str, state: RetentionState | None) -> None:
        seq.finishing, seq.final_feed = reason, False
        tail = seq.detok.finish_text()
        if seq.prefilled < seq.prompt_len:
            self.on_prompt_read(seq.prompt_len - seq.prefilled)
        self.sched.remove_queued(seq)
        out = RequestOutput(
            seq.request.request_id,
            [],
            tail,
            [] if seq.request.params.logprobs else None,
            finished=True,
            finish_reason=reason,  # type: ignore[arg-type]
            usage=Usage(seq.prompt_len, seq.detok.num_reported),
            state=state,
            timings=seq.timings,
        )
        seq.snapshots.clear()
        seq.emit(out)
        self.on_finished(seq)

    def abort(self, seq: Sequence) -> None:
        """End a request now (waiting, prefilling) or within one iteration (running)."""
        if seq.finishing is not None:
            return  # already ending (at most one more iteration)
        if seq not in self.sched.running:
            self._finalize(seq, "abort", None)
            return
        seq.detok.pending = []
        r = seq.detok.num_reported
        if r == seq.absorbed + 1:
            seq.finishing, seq.final_feed = "abort", True
            return
        if r == seq.absorbed:
            assert self.batch_state is not None
            state = self.batch_state.select([self.sched.running.index(seq)])
        else:
            state = seq.snapshots[r]
        self._finalize(seq, "abort", state)
        self._compact()

    def abort_all(self) -> None:
        """Abort every request; rows that must absorb a last token leave after one more step."""
        for seq in [*self.sched.waiting, *self.sched.prefilling, *self.sched.running]:
            self.abort(seq)
        while self.sched.has_work():
            self.step()
