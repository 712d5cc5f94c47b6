"""Admission under limits and the per-iteration prefill plan.

Life of a request: waiting -> prefilling (holds a row; its prompt is read in pieces that start and
end at multiples of `prefill_chunk`, or at the prompt's end) -> running (one row of the batched
recurrent step) -> finished. A request with an empty prompt (it brings the logits of its state)
skips prefilling: admitted, it is `ready` to join the batch in the same iteration.
A request with a token-dropping policy (keep < 1) is read whole, alone, in one iteration (it scores
the whole prompt, so it cannot be split into pieces); requests behind it wait for the next one.
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

import torch

from server.engine.live import LiveRequest
from server.engine.types import EngineConfig

log = logging.getLogger(__name__)


class Scheduler:
    """Queues and the prefill plan; owned by the engine thread (no locking here)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.waiting: deque[LiveRequest] = deque()
        self.prefilling: list[LiveRequest] = []
        self.ready: list[LiveRequest] = []  # admitted with an empty prompt: join the batch this iteration
        self.running: list[LiveRequest] = []  # in batch-row order

    @property
    def num_rows(self) -> int:
        return len(self.prefilling) + len(self.ready) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.ready or self.running)

    def admit(self) -> None:
        while self.waiting and self.num_rows < self.config.max_running:
            live = self.waiting.popleft()
            live.timings.queue_s = time.perf_counter() - live.timings.arrival
            if live.prompt_len == 0:
                self.ready.append(live)
                continue
            if self.config.keep_mask is not None and live.dropping is None:
                live.keep = self._keep_mask(live)
            self.prefilling.append(live)

    def _keep_mask(self, live: LiveRequest) -> torch.Tensor | None:
        """The `EngineConfig.keep_mask` hook's (T,) bool mask for this prompt (on the engine thread)."""
        assert self.config.keep_mask is not None
        keep = self.config.keep_mask(live.request, live.request.prompt_ids)
        if keep is None:
            return None
        mask = torch.as_tensor(keep).bool().reshape(-1)  # (T,)
        if mask.numel() != live.prompt_len:
            log.warning(
                "keep mask of %d entries for %d prompt tokens: ignored", mask.numel(), live.prompt_len
            )
            return None
        return mask

    def plan_prefill(self) -> list[tuple[LiveRequest, int, int]]:
        """(request, start, end) prompt pieces to read this iteration, in arrival order.

        A request with a dropping policy is planned alone and whole (first in line), or not at all.
        """
        plan: list[tuple[LiveRequest, int, int]] = []
        cfg = self.config
        budget = cfg.prefill_budget_decoding if self.running else cfg.prefill_budget
        c = cfg.prefill_chunk
        for live in self.prefilling:
            if live.dropping is not None:
                return plan or [(live, 0, live.prompt_len)]
            start = live.prefilled  # a multiple of c
            end = live.prompt_len if live.prompt_len - start <= budget else (start + budget) // c * c
            if end <= start:  # less than a segment of budget left
                if plan:
                    break
                end = min(live.prompt_len, start + c)
            plan.append((live, start, end))
            budget -= end - start
            if budget <= 0:
                break
        return plan

    def remove_queued(self, live: LiveRequest) -> None:
        """Drop a finished request from the queues (running rows leave on compaction)."""
        for queue in (self.prefilling, self.ready, self.waiting):
            if live in queue:  # identity: LiveRequest has no field-wise equality
                queue.remove(live)
