"""The engine's own request / output types, independent of any HTTP protocol model."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from model.sampling import SamplingParams
from model.state import RetentionState

if TYPE_CHECKING:
    from model.dropping import DropSpec

FinishReason = Literal["length", "eos", "stop_token", "stop", "abort", "error"]  # error: engine failure

_ids = itertools.count()


class EngineOverloaded(RuntimeError):
    """`submit` refused a request: a limit is reached or the engine is shutting down (HTTP 503)."""


@dataclass
class EngineSamplingParams(SamplingParams):
    """Model sampling parameters plus the engine's stopping and reporting options.

    - `max_tokens`: most completion tokens (0 = only read the prompt).
    - `min_tokens`: before this many completion tokens, EOS and `stop_token_ids` are masked out of
      sampling and stop strings are not looked for.
    - `stop`: stop strings; the completion ends before the first occurrence (never emitted).
    - `stop_token_ids`: tokens that end the completion (reported, text not emitted).
    - `ignore_eos`: EOS does not end the completion.
    - `logprobs`: report the chosen token's log-probability; `top_logprobs`: that many alternatives.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def validate_engine(self, vocab_size: int) -> None:
        """ValueError unless every parameter is usable (sampling and stopping options)."""
        self.validate(vocab_size)
        self.validate_stopping(vocab_size)

    def validate_stopping(self, vocab_size: int) -> None:
        """ValueError unless the engine's own options (stopping, reporting) are usable."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be ids in [0, {vocab_size})")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}")


@dataclass(eq=False)  # holds tensors: compared by identity, never field by field
class EngineRequest:
    """One generation: prompt ids read on top of `state` (None = a fresh sequence).

    - `dropping`: read the whole prompt at once with a token-dropping policy (`model.dropping`).
    - `logits`: (V,) next-token logits that belong to `state` (a final output's `logits`): with an
      empty `prompt_ids`, the first token is sampled from them and no prompt is read.
    """

    prompt_ids: list[int]
    params: EngineSamplingParams = field(default_factory=EngineSamplingParams)
    state: RetentionState | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    dropping: DropSpec | None = None
    logits: torch.Tensor | None = None  # (V,)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    dropped_tokens: int = 0  # prompt tokens a dropping policy left out of the state


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class RequestTimings:
    """Seconds (time.perf_counter based) for metrics."""

    arrival: float
    queue_s: float | None = None  # arrival -> first prefill chunk
    prefill_s: float | None = None  # first prefill chunk -> prompt fully read
    ttft_s: float | None = None  # arrival -> first token sampled
    inter_token_s: list[float] = field(default_factory=list)  # gaps between sampled tokens


@dataclass(eq=False)  # holds tensors: compared by identity, never field by field
class RequestOutput:
    """A delta: tokens and text reported since the previous output of the same request.

    The last output has `finished` True, a `finish_reason`, `usage`, `state`: the state after
    reading the prompt plus every token ever reported, and `logits`: the (V,) float32 CPU
    next-token logits of that state (both None if the request was aborted before its prompt was
    fully read, or ended with "error").
    """

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    state: RetentionState | None = None
    timings: RequestTimings | None = None
    logits: torch.Tensor | None = None  # (V,) float32 CPU, final output only


@dataclass
class IterationStats:
    """One scheduler iteration, for metrics and tests."""

    prefill_tokens: int  # prompt tokens read this iteration
    prefill_rows: int
    decode_rows: int  # batch size of the recurrent step (0 = none)
    prefill_s: float
    decode_s: float
    total_s: float


# (request, prompt ids) -> (T,) bool keep mask for the prompt, or None = keep every token.
KeepMaskFn = Callable[[EngineRequest, list[int]], "torch.Tensor | None"]


@dataclass
class EngineConfig:
    """Limits and scheduling knobs."""

    max_running: int = 64  # rows in the decode batch (prefilling requests count too)
    max_waiting: int = 256  # requests waiting for a row
    max_queued_prompt_tokens: int = 1 << 20  # unread prompt tokens over waiting + prefilling
    prefill_chunk: int = 64  # prompt reads start and end at multiples of this (or at the prompt's end)
    prefill_budget: int = 1024  # prompt tokens per iteration while no row is decoding
    prefill_budget_decoding: int = 64  # ... while rows are decoding (bounds their inter-token latency)
    chunk_size: int = 64  # the model's chunkwise block size
    keep_mask: KeepMaskFn | None = None
    # torch intra-op threads of the engine thread (None: torch's default). For CPU speed, keep other
    # threads (the event loop's) at 1: a second OpenMP team in the process slows every small op of
    # the engine's team (a B=1 decode step went from 1.5 to 5 ms on a 2-core box).
    num_threads: int | None = None
    # torch.compile the decode step for these batch sizes (compiled at engine start; see decode.py)
    compile: bool = False
    compile_buckets: tuple[int, ...] = (1, 2, 4, 8)  # larger batches run eagerly (decode.py)
    stats_history: int = 4096  # IterationStats kept

    def __post_init__(self) -> None:
        for name in (
            "max_running",
            "max_waiting",
            "max_queued_prompt_tokens",
            "prefill_chunk",
            "prefill_budget",
            "prefill_budget_decoding",
            "chunk_size",
            "stats_history",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {v!r}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ValueError(f"EngineConfig.num_threads must be None or >= 1, got {self.num_threads!r}")
