"""Admission under limits, the per-iteration prefill plan, and per-request runtime state.

Life of a request: waiting -> prefilling (holds a row; its prompt is read in pieces that start and
end at multiples of `prefill_chunk`, or at the prompt's end) -> running (one row of the batched
recurrent step) -> finished.
Each iteration the scheduler admits waiting requests while rows are free, then plans prompt pieces
in arrival order under a token budget that adapts to the load: `prefill_budget` (large: a long
prompt is read in few big chunkwise passes) while no row is decoding, `prefill_budget_decoding`
(small: the running streams' inter-token latency stays bounded) while rows are. At least one
`prefill_chunk` segment is read per iteration, so a prompt always progresses.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.state import RetentionState
from server.engine.detokenizer import Detokenizer
from server.engine.types import EngineConfig, EngineRequest, RequestOutput, RequestTimings, TokenLogprob

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: membership tests must never compare state tensors
class Sequence:
    """The engine's runtime view of one request."""

    request: EngineRequest
    detok: Detokenizer
    generator: torch.Generator | None
    timings: RequestTimings
    emit: Callable[[RequestOutput], None]  # thread-safe delivery to the request's stream
    keep: torch.Tensor | None = None  # (T,) bool prompt keep mask
    prefilled: int = 0  # prompt tokens read
    state: RetentionState | None = None  # own state while prefilling (batch 1)
    generated: list[int] = field(default_factory=list)
    absorbed: int = 0  # generated tokens the state has read
    snapshots: dict[int, RetentionState] = field(default_factory=dict)  # n absorbed -> row state
    counts: torch.Tensor | None = None  # (V,) token counts for penalties
    finishing: str | None = None  # finish reason once decided
    final_feed: bool = False  # feed the last token once more, then finish
    aborted: bool = False
    last_token_time: float | None = None
    prefill_start: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def remaining_prompt(self) -> int:
        return self.prompt_len - self.prefilled


class Scheduler:
    """Queues and the prefill plan; owned by the engine thread (no locking here)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []  # in batch-row order

    @property
    def num_rows(self) -> int:
        return len(self.prefilling) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def admit(self) -> None:
        while self.waiting and self.num_rows < self.config.max_running:
            seq = self.waiting.popleft()
            seq.timings.queue_s = time.perf_counter() - seq.timings.arrival
            if self.config.keep_mask is not None:  # the token-dropping hook, on the engine thread
                keep = self.config.keep_mask(seq.request, seq.request.prompt_ids)
                seq.keep = None if keep is None else torch.as_tensor(keep).bool().reshape(-1)
                if seq.keep is not None and seq.keep.numel() != seq.prompt_len:
                    log.warning(
                        "keep mask of %d entries for %d prompt tokens: ignored",
                        seq.keep.numel(),
                        seq.prompt_len,
                    )
                    seq.keep = None
            self.prefilling.append(seq)

    def plan_prefill(self) -> list[tuple[Sequence, int, int]]:
        """(sequence, start, end) prompt pieces to read this iteration."""
        plan: list[tuple[Sequence, int, int]] = []
        cfg = self.config
        budget = cfg.prefill_budget_decoding if self.running else cfg.prefill_budget
        c = cfg.prefill_chunk
        for seq in self.prefilling:
            start = seq.prefilled  # a multiple of c
            end = seq.prompt_len if seq.prompt_len - start <= budget else (start + budget) // c * c
            if end <= start:  # less than a segment of budget left
                if plan:
                    break
                end = min(seq.prompt_len, start + c)
            plan.append((seq, start, end))
            budget -= end - start
            if budget <= 0:
                break
        return plan

    def remove_queued(self, seq: Sequence) -> None:
        """Drop a finished request from the waiting / prefilling queues (running rows leave on compaction)."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
