"""`LiveRequest`: the engine's runtime record of one request, from submit to its final output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from model.sampling import SamplingTensors
from model.state import RetentionState
from server.engine.detokenizer import Detokenizer
from server.engine.types import EngineRequest, RequestOutput, RequestTimings, TokenLogprob

if TYPE_CHECKING:
    from model.dropping import DropSpec

# (state, next-token logits (V,)) of one row after it absorbed a given number of generated tokens
Snapshot = tuple[RetentionState, torch.Tensor]


@dataclass(eq=False)  # identity: membership tests (`in`, `.index`, `.remove`) must never compare tensors
class LiveRequest:
    """Everything the engine tracks for one request; touched by the engine thread only (after submit).

    Life: waiting -> prefilling (holds a row, prompt read in pieces; `state` is its own row) ->
    running (one row of the batched state, `state` is None) -> finished.
    """

    request: EngineRequest
    detok: Detokenizer
    sampling: SamplingTensors  # this request's sampling row (B=1), built and validated at submit
    timings: RequestTimings
    emit: Callable[[RequestOutput], None]  # thread-safe delivery to the request's stream
    dropping: DropSpec | None = None  # the request's policy if it can drop anything (keep < 1)
    keep: torch.Tensor | None = None  # (T,) bool prompt keep mask (EngineConfig.keep_mask hook)
    prefilled: int = 0  # prompt tokens read
    dropped: int = 0  # prompt tokens a dropping policy left out
    state: RetentionState | None = None  # own state (batch 1) until the row joins the batch
    next_logits: torch.Tensor | None = None  # (V,) logits of the row's current state (latest forward)
    generated: list[int] = field(default_factory=list)
    absorbed: int = 0  # generated tokens the state has read
    snapshots: dict[int, Snapshot] = field(default_factory=dict)  # n absorbed -> row (stop strings)
    counts: torch.Tensor | None = None  # (V,) token counts for penalties
    finish_reason: str | None = None  # set once the end is decided
    absorb_last: bool = False  # the last sampled token still goes through one decode step, then finish
    last_token_time: float | None = None
    prefill_start: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)
