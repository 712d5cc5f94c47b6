"""One engine iteration: admission, prompt reading under a budget, one batched recurrent step, then
sampling and finishing through `Completions`.

How the last sampled token is absorbed (the final-state rule): a request's returned state has read
exactly its prompt plus the tokens reported to the client (`usage.completion_tokens`), and its
returned `logits` are the next-token logits of that state, taken from the forward that produced it
(no extra pass).

- A sampled token is fed to the model in the next batched recurrent step (that step's logits give
  the following token). When a request ends on a sampled token it keeps its row for that one more
  step (`absorb_last`): the token is fed, the row leaves with that step's state and logits.
  This covers "length", "eos" and "stop_token" and an abort after all tokens were reported.
- Tokens held back for stop strings (see `detokenizer`) may already be absorbed when a stop string
  cuts them; rows with stop strings therefore keep a snapshot (state, logits) after each token
  until that token is reported, and a stop-string finish (or an abort that drops held-back
  tokens) returns the snapshot taken after the last reported token.
- A request that only reads (max_tokens=0) returns the state and logits of its prompt's last piece.
- An abort before the prompt was fully read returns no state and no logits (None).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from model.retnet import RetNet
from model.state import RetentionState
from model.tokenizer import Tokenizer
from server.engine.completion import Completions
from server.engine.decode import DecodeStep
from server.engine.live import LiveRequest
from server.engine.prefill import Piece, read_pieces, read_with_dropping
from server.engine.scheduler import Scheduler
from server.engine.types import EngineConfig, IterationStats


class BatchRunner:
    """Owns the running rows' batched state; runs iterations; every method runs on the engine thread.

    Callbacks: `on_prompt_tokens_read(n)` as prompt tokens leave the queue (read, or dropped with
    their request), `on_released(live)` once per request after its final output,
    `after_prefill()` once prompts were read (delivers first tokens before the decode step).
    """

    def __init__(
        self,
        model: RetNet,
        tokenizer: Tokenizer,
        config: EngineConfig,
        on_prompt_tokens_read: Callable[[int], None] = lambda n: None,
        on_released: Callable[[LiveRequest], None] = lambda live: None,
        after_prefill: Callable[[], None] = lambda: None,
    ) -> None:
        self.model = model
        self.config = config
        self.sched = Scheduler(config)
        self.decode_step = DecodeStep(model, config.compile, config.compile_buckets)
        self.batch_state: RetentionState | None = None  # rows = sched.running
        eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_id
        self.completions = Completions(model.config.vocab_size, eos, self._release)
        self.on_prompt_tokens_read = on_prompt_tokens_read
        self.on_released = on_released
        self.after_prefill = after_prefill

    # ---- one iteration -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> IterationStats:
        t0 = time.perf_counter()
        self.sched.admit()
        joining, self.sched.ready = self.sched.ready, []
        plan = self.sched.plan_prefill()
        if plan:
            joining += self._read_prompts(plan)
        if joining:
            self._join(joining)
        if plan or joining:
            self.after_prefill()
        t1 = time.perf_counter()
        rows = len(self.sched.running)
        if rows:
            self._decode()
        t2 = time.perf_counter()
        n_prefill = sum(e - s for _, s, e in plan)
        return IterationStats(n_prefill, len(plan), rows, t1 - t0, t2 - t1, t2 - t0)

    def _read_prompts(self, plan: list[Piece]) -> list[LiveRequest]:
        """Read the planned pieces; returns the requests whose prompt is now fully read."""
        t_start = time.perf_counter()
        first = plan[0][0]
        if first.dropping is not None:
            assert len(plan) == 1, "a dropping prompt is read alone"
            logits, new, first.dropped = read_with_dropping(self.model, first, self.config.chunk_size)
        else:
            logits, new = read_pieces(self.model, plan, self.config.chunk_size)  # (n, V), n rows
        now = time.perf_counter()
        done: list[LiveRequest] = []
        for i, (live, s, e) in enumerate(plan):
            if live.prefill_start is None:
                live.prefill_start = t_start
            live.state, live.next_logits = new.select([i]), logits[i]
            live.prefilled = e
            self.on_prompt_tokens_read(e - s)
            if e == live.prompt_len:
                live.timings.prefill_s = now - live.prefill_start
                done.append(live)
        for live in done:
            self.sched.prefilling.remove(live)
        return done

    def _join(self, lives: list[LiveRequest]) -> None:
        """Requests whose prompt is read (own state and logits set): finish the read-only ones, add
        the others as batch rows and sample their first token."""
        joining = []
        for live in lives:
            assert live.state is not None and live.next_logits is not None
            if live.request.params.max_tokens == 0:
                self.completions.finish(live, "length", (live.state, live.next_logits))
            else:
                joining.append(live)
        if not joining:
            return
        first = torch.stack([live.next_logits.float() for live in joining])  # (k, V)
        for live in joining:
            if live.request.params.stop:
                live.snapshots[0] = (live.state, live.next_logits)
        new_state = RetentionState.stack([live.state for live in joining])
        for live in joining:
            live.state = None
        self.sched.running.extend(joining)
        old = self.batch_state
        self.batch_state = new_state if old is None else RetentionState.stack([old, new_state])
        self.completions.sample_and_accept(joining, first)
        self._compact()

    def _decode(self) -> None:
        running = self.sched.running
        assert self.batch_state is not None
        toks = torch.tensor([[live.generated[-1]] for live in running], dtype=torch.long)  # (B, 1)
        logits, self.batch_state = self.decode_step(toks.to(self.model.device), self.batch_state)  # (B, V)
        sample_rows: list[int] = []
        for i, live in enumerate(running):
            live.absorbed += 1
            live.next_logits = logits[i]
            if live.absorb_last:
                reason = live.finish_reason or "length"
                self.completions.finish(live, reason, (self.batch_state.select([i]), logits[i]))
                continue
            if live.request.params.stop:
                # a copy of the row: a view would keep this step's whole (B, V) logits alive
                live.snapshots[live.absorbed] = (self.batch_state.select([i]), logits[i].clone())
            sample_rows.append(i)
        if sample_rows:
            self.completions.sample_and_accept([running[i] for i in sample_rows], logits[sample_rows])
        self._compact()

    def _compact(self) -> None:
        """Drop finished rows from the batch (one `select` when membership shrinks)."""
        running = self.sched.running
        keep = [i for i, live in enumerate(running) if live.finish_reason is None or live.absorb_last]
        if len(keep) == len(running):
            return
        self.sched.running = [running[i] for i in keep]
        self.batch_state = self.batch_state.select(keep) if keep and self.batch_state is not None else None

    def _release(self, live: LiveRequest) -> None:
        if live.prefilled < live.prompt_len:
            self.on_prompt_tokens_read(live.prompt_len - live.prefilled)
        self.sched.remove_queued(live)
        self.on_released(live)

    # ---- aborts --------------------------------------------------------------------------------
    def abort(self, live: LiveRequest) -> None:
        """End a request now (waiting, prefilling) or within one iteration (running)."""
        if live.finish_reason is not None:
            return  # already ending (at most one more iteration)
        if live not in self.sched.running:  # identity (LiveRequest has no field-wise ==)
            self.completions.finish(live, "abort", None)
            return
        live.detok.pending = []
        r = live.detok.num_reported
        if r == live.absorbed + 1:
            live.finish_reason, live.absorb_last = "abort", True
            return
        if r == live.absorbed:
            assert self.batch_state is not None and live.next_logits is not None
            row = self.sched.running.index(live)
            final = (self.batch_state.select([row]), live.next_logits)
        else:
            final = live.snapshots[r]
        self.completions.finish(live, "abort", final)
        self._compact()

    def abort_all(self) -> None:
        """Abort every request; rows that must absorb a last token leave after one more step."""
        for live in [*self.sched.waiting, *self.sched.prefilling, *self.sched.running]:
            self.abort(live)
        while self.sched.has_work():
            self.step()
