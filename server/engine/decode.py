"""The batched recurrent decode step, optionally `torch.compile`d with fixed batch-size buckets.

gpt-fast style: the step is compiled where it is called, with static shapes. A batch of B rows runs
in the smallest bucket >= B, padded with empty rows (token 0 on a zero state) that are dropped from
the outputs, so each bucket compiles once (at warm-up) and never recompiles. Batches larger than
the last bucket run eagerly.

Compiled and eager steps agree to float rounding (~1e-5 relative on CPU), not bit for bit, so with
compilation on, "batched == alone" holds to that tolerance rather than exactly.
Measured on the 2-core CPU box (docs/benchmarks.md): faster at small batches only (see DEFAULT_BUCKETS).
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from torch import Tensor

from model.retnet import RetNet
from model.state import RetentionState

log = logging.getLogger(__name__)

# Small batches only: on the 2-core CPU box the compiled step is ~1.8x faster than eager at B=1 and
# ~1.3x at B=8 but ~1.2x *slower* at B=32 (bench/bench_decode.py); larger batches run eagerly.
DEFAULT_BUCKETS = (1, 2, 4, 8)

# The model's lru_caches (decay rates, rotary frequencies) are pure functions of their arguments.
warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools.lru_cache`")


class DecodeStep:
    """`step(tokens (B, 1), state) -> (logits (B, V), new state)` for the running rows."""

    def __init__(self, model: RetNet, compile: bool = False, buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        if compile and (not buckets or any(b < 1 for b in buckets)):
            raise ValueError(f"compile buckets must be positive batch sizes, got {buckets!r}")
        self.model = model
        self.buckets = tuple(sorted(set(buckets))) if compile else ()
        self._fn = torch.compile(self._eager, dynamic=False) if compile else None
        if compile:
            # one graph per bucket; dynamo's default limit (8 per function) would silently fall back
            # to eager once exceeded
            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, len(self.buckets) + 8)

    @classmethod
    def shared(cls, model: RetNet, compile: bool, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> DecodeStep:
        """One compiled step per model and bucket set: engines on the same model reuse its graphs
        (dynamo guards on `self`, so a new instance would compile every bucket again)."""
        if not compile:
            return cls(model)
        per_model: dict[tuple[int, ...], DecodeStep] = model.__dict__.setdefault("_retserve_decode_steps", {})
        key = tuple(sorted(set(buckets)))
        if key not in per_model:
            per_model[key] = cls(model, True, key)
        return per_model[key]

    def _eager(self, tokens: Tensor, layers: list[Tensor], position: Tensor):
        logits, st = self.model(
            tokens, RetentionState(list(layers), position, self.model.config), mode="recurrent"
        )
        return logits[:, -1], st.layers, st.position  # (B, V), L x (B, H, Dk, Dv), (B,)

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def __call__(self, tokens: Tensor, state: RetentionState) -> tuple[Tensor, RetentionState]:
        B = tokens.shape[0]
        b = self.bucket(B)
        if self._fn is None or b is None:
            logits, layers, position = self._eager(tokens, state.layers, state.position)
            return logits, RetentionState(layers, position, self.model.config)
        pad = b - B
        layers, position = state.layers, state.position
        if pad:
            tokens = torch.cat([tokens, tokens.new_zeros(pad, 1)])
            layers = [torch.cat([s, s.new_zeros(pad, *s.shape[1:])]) for s in layers]
            position = torch.cat([position, position.new_zeros(pad)])
        logits, layers, position = self._fn(tokens, layers, position)
        if pad:
            logits, layers, position = logits[:B], [s[:B] for s in layers], position[:B]
        return logits, RetentionState(layers, position, self.model.config)

    @torch.no_grad()
    def warmup(self) -> float:
        """Compile every bucket now (not on a user's first request); returns the seconds spent."""
        t0 = time.perf_counter()
        for b in self.buckets:
            tokens = torch.zeros(b, 1, dtype=torch.long, device=self.model.device)
            self(tokens, self.model.empty_state(b))
        dt = time.perf_counter() - t0
        if self.buckets:
            log.info("compiled the decode step for batch sizes %s in %.1fs", self.buckets, dt)
        return dt
