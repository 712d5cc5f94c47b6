"""The batched recurrent decode step: model.fast.FastDecoder, optionally `torch.compile`d per batch bucket.

Every step runs the fast one-token path (fused projections, rotary from one table per step, the
state updated in place). The batch's state is validated once, when the runner forms it (a new
RetentionState object); the steps that follow reuse it without checks and advance it in place
(`__call__` returns the same state object).

With compilation (gpt-fast style, static shapes): a batch of B rows runs in the smallest bucket
>= B. Each bucket owns preallocated buffers (tokens, state, positions) of its size; rows are copied
in and out around the compiled call (the padding rows are never read), so each bucket compiles once
(at warm-up) and never recompiles. At warm-up each bucket is also timed compiled and eager, and
runs whichever was faster on this machine (`choice`); batches larger than the last bucket run
eagerly. Compiled and eager steps agree to float rounding (~1e-6 relative on CPU), not bit for bit.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from model.fast import FastDecoder
from model.retnet import RetNet
from model.state import RetentionState

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8)

# The model's lru_caches (decay rates, rotary frequencies) are pure functions of their arguments.
warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools.lru_cache`")


class _Bucket:
    """Preallocated inputs of one compiled batch size."""

    def __init__(self, size: int, model: RetNet) -> None:
        self.size = size
        self.state = model.empty_state(size)  # zero rows: padding rows stay finite
        self.tokens = torch.zeros(size, dtype=torch.long, device=model.device)


class DecodeStep:
    """`step(tokens (B, 1), state) -> (logits (B, V), state)` for the running rows; the state is
    advanced in place and returned. One per engine; every step of a model shares its fused decoder
    (`FastDecoder.shared`) and compiled graphs, each with buffers of its own."""

    def __init__(
        self,
        model: RetNet,
        compile: bool = False,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        select_by_timing: bool = True,
    ) -> None:
        if compile and (not buckets or any(b < 1 for b in buckets)):
            raise ValueError(f"compile buckets must be positive batch sizes, got {buckets!r}")
        self.model = model
        self.decoder = FastDecoder.shared(model)
        self.buckets = tuple(sorted(set(buckets))) if compile else ()
        self.select_by_timing = select_by_timing
        self.choice: dict[int, str] = {b: "compiled" for b in self.buckets}  # set by warmup's timing
        self._buffers = {b: _Bucket(b, model) for b in self.buckets}
        self._fn: Callable[..., Tensor] | None = None
        if compile:
            # one compiled function per decoder: engines on the same model reuse its graphs (dynamo
            # guards on the decoder), each with buffers of its own
            cached = model.__dict__.get("_retserve_compiled_step")
            if cached is None or cached[0] is not self.decoder:
                cached = (self.decoder, torch.compile(self.decoder.step, dynamic=False))
                model.__dict__["_retserve_compiled_step"] = cached
            self._fn = cached[1]
            # one graph per bucket; dynamo's default limit (8 per function) would silently fall back
            # to eager once exceeded
            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, len(self.buckets) + 8)
        self._checked: RetentionState | None = None

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def __call__(self, tokens: Tensor, state: RetentionState) -> tuple[Tensor, RetentionState]:
        toks = tokens.reshape(-1)
        if state is not self._checked or toks.shape[0] != state.batch_size:  # a new batch: validate once
            self.decoder.check_batch(toks, state)
            self._checked = state
        B = toks.shape[0]
        b = self.bucket(B)
        if self._fn is None or b is None or self.choice[b] == "eager":
            return self.decoder.step(toks, state.layers, state.position), state
        if b == B:
            return self._fn(toks, state.layers, state.position), state
        buf = self._buffers[b]
        buf.tokens[:B].copy_(toks)
        buf.state.position[:B].copy_(state.position)
        for dst, src in zip(buf.state.layers, state.layers, strict=True):
            dst[:B].copy_(src)
        logits = self._fn(buf.tokens, buf.state.layers, buf.state.position)
        for dst, src in zip(state.layers, buf.state.layers, strict=True):
            dst.copy_(src[:B])
        state.position.copy_(buf.state.position[:B])
        return logits[:B], state

    @torch.no_grad()
    def warmup(self) -> float:
        """Compile every bucket now (not on a user's first request) and, with `select_by_timing`, keep
        per bucket whichever of compiled and eager is faster here; returns the seconds spent."""
        t0 = time.perf_counter()
        for b in self.buckets:
            self._run(b, "compiled", 2)  # compiles
            if self.select_by_timing:
                self.choice[b] = self._faster(b)
        dt = time.perf_counter() - t0
        if self.buckets:
            log.info("decode step for batch sizes %s: %s (warm-up %.1fs)", self.buckets, self.choice, dt)
        return dt

    def _faster(self, b: int, rounds: int = 5, steps: int = 10) -> str:
        """Time the bucket's step compiled and eager, in turns; the faster one by median."""
        times: dict[str, list[float]] = {"compiled": [], "eager": []}
        for _ in range(rounds):
            for kind in times:
                times[kind].append(self._run(b, kind, steps))
        return min(times, key=lambda k: statistics.median(times[k]))

    def _run(self, b: int, kind: str, steps: int) -> float:
        """`steps` steps of a full bucket on its own buffers, seconds per step."""
        self.choice[b] = kind
        buf = self._buffers[b]
        sync = torch.cuda.synchronize if buf.tokens.is_cuda else (lambda: None)  # GPU work is async
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self(buf.tokens, buf.state)
        sync()
        return (time.perf_counter() - t0) / steps
