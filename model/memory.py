"""Memory operations on retention states: shift (rotate keys), concatenate, average.

Per layer and head a state is S = sum_j gamma^(p-1-j) R(j)k_j^T v_j over the tokens j < p it read, where
p is its position (tokens read), R(j) the rotary rotation at absolute position j (model/layers.py
Rotary: half-split pairs (i, i + Dk/2) rotated by j * theta_i) acting on the key axis, gamma the head's
decay. Assumption throughout: a state at position p read positions 0 .. p-1 (the usual case: a
session read from a fresh state). Rotations compose, R(a + b) = R(a) R(b), which gives:

- `rotate_keys(state, delta)`: R(delta) on the key axis, S -> sum_j gamma^(p-1-j) R(j+delta)k_j^T v_j:
  exactly the state of the same tokens read at positions delta .. delta+p-1 from an empty state (decay
  is relative to the end, so it does not change). The position field is not changed.

- `merge_concat([S_1, S_2])`: "as if the sources had been read one after another":
  S = gamma^(n_2) S_1 + R(n_1) S_2, position n_1 + n_2 (folded left for more sources). For the first
  layer this is exact (its keys and values depend on each token alone); in deeper layers a token's
  k and v depend on what the layers below had read, which for S_2 did not include text 1, so it is an
  approximation: the right tool for pieces that are nearly independent (documents, retrieved passages)
  whose order matters.

- `merge_average(states, weights)`: a weighted "soup". Each source is shifted to end at the largest
  position P = max n_i, as if its text had been read at positions P-n_i .. P-1 from an empty state:
  rotate its keys by P - n_i and do *not* decay it (its last token is still the last one read, so
  every token is as far from the end as before). Then S = sum_i w_i R(P - n_i) S_i, position P.
  Useful for blending alternatives of similar length (several summaries, paraphrases, personas) where
  order has no meaning; weights default to uniform and must be finite, >= 0 and sum to 1 (within 1e-6).

Arithmetic is float64, the result is cast back to the sources' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from model.layers import Rotary
from model.ops import retention_log_decay
from model.state import RetentionState, StateMismatchError

__all__ = ["merge_average", "merge_concat", "rotate_keys"]


def _rotate(t: Tensor, delta: Tensor, dim: int, base: float) -> Tensor:
    """R(delta) on the key axis of t (B, H, Dk, Dv), delta (B,) int64; computed in float64."""
    rope = Rotary(delta.to(t.device)[:, None], dim, base, torch.float64)  # cos, sin: (B, 1, 1, Dk)
    x = t.to(torch.float64).permute(0, 3, 1, 2)  # (B, Dv, H, Dk)
    return rope.rotate(x).permute(0, 2, 3, 1)  # (B, H, Dk, Dv)


def _deltas(state: RetentionState, delta: int | Tensor) -> Tensor:
    if isinstance(delta, Tensor):
        if delta.is_floating_point() or delta.dtype == torch.bool or delta.ndim > 1:
            raise ValueError("delta must be an integer or a (B,) integer tensor of positions")
        d = delta.to(device=state.device, dtype=torch.long)
        if d.ndim == 1 and d.shape[0] != state.batch_size:
            raise ValueError(f"delta has {d.shape[0]} entries, the state has {state.batch_size} rows")
        return d.expand(state.batch_size)
    if isinstance(delta, bool) or not isinstance(delta, int):
        raise ValueError(f"delta must be an integer number of positions, got {delta!r}")
    return torch.full((state.batch_size,), delta, dtype=torch.long, device=state.device)


def rotate_keys(state: RetentionState, delta: int | Tensor) -> RetentionState:
    """Rotate the key axis of every layer's state by delta positions (int, or (B,) per row).

    The result is the state of the same tokens read `delta` positions later (see the module docstring);
    `position` is left as it is: the caller decides what the shifted state's position is.
    """
    d = _deltas(state, delta)
    c = state.config
    layers = [_rotate(t, d, c.head_k_dim, c.rope_theta).to(t.dtype) for t in state.layers]
    return RetentionState(layers, state.position.clone(), c)


def _check_sources(states: Sequence[RetentionState], what: str) -> list[int]:
    """Validate single-row sources of one model; return their positions."""
    if isinstance(states, RetentionState) or not isinstance(states, Sequence) or len(states) == 0:
        raise ValueError(f"{what} takes a non-empty list of RetentionState")
    first = states[0]
    for i, s in enumerate(states):
        if not isinstance(s, RetentionState):
            raise ValueError(f"{what}: source {i} is a {type(s).__name__}, not a RetentionState")
        if s.batch_size != 1:
            raise ValueError(
                f"{what}: source {i} has {s.batch_size} rows; each source must be one row (state.split())"
            )
        if s.config.fingerprint_dict() != first.config.fingerprint_dict():
            raise StateMismatchError(f"{what}: source {i} belongs to a model of another shape than source 0")
        if s.dtype != first.dtype or s.device != first.device:
            raise StateMismatchError(
                f"{what}: source {i} is {s.dtype} on {s.device}, source 0 is {first.dtype} on {first.device}"
            )
    return [int(s.position[0]) for s in states]


def merge_concat(states: Sequence[RetentionState]) -> RetentionState:
    """One row "as if the sources had been read one after another" (module docstring); position = sum."""
    positions = _check_sources(states, "merge_concat")
    first = states[0]
    c = first.config
    log_gamma = retention_log_decay(c.num_heads, first.device)[None, :, None, None]  # (1, H, 1, 1)
    layers = [t.to(torch.float64) for t in first.layers]
    n1 = positions[0]
    for s, n2 in zip(states[1:], positions[1:], strict=True):
        shift = torch.tensor([n1], dtype=torch.long, device=first.device)
        decay = torch.exp(n2 * log_gamma)  # (1, H, 1, 1): gamma^(n_2)
        layers = [
            decay * a + _rotate(b, shift, c.head_k_dim, c.rope_theta)
            for a, b in zip(layers, s.layers, strict=True)
        ]
        n1 += n2
    out = [t.to(first.dtype) for t in layers]
    return RetentionState(out, torch.tensor([n1], dtype=torch.long, device=first.device), c)


def average_weights(weights: Sequence[float] | Tensor | None, n: int) -> list[float]:
    """The weights merge_average uses for `n` sources: uniform for None, else checked (ValueError
    saying what to fix: one per source, finite, >= 0, summing to 1 within 1e-6)."""
    if weights is None:
        return [1.0 / n] * n
    w = weights.tolist() if isinstance(weights, Tensor) else list(weights)
    if len(w) != n:
        raise ValueError(f"merge_average: {len(w)} weights for {n} states; give one weight per state")
    for x in w:
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < 0:
            raise ValueError(f"merge_average: weights must be finite numbers >= 0, got {x!r}")
    total = math.fsum(w)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"merge_average: weights must sum to 1 (within 1e-6), they sum to {total!r}")
    return [float(x) for x in w]


def merge_average(
    states: Sequence[RetentionState], weights: Sequence[float] | Tensor | None = None
) -> RetentionState:
    """Weighted average of the sources, each shifted to end at the largest position (module docstring)."""
    positions = _check_sources(states, "merge_average")
    w = average_weights(weights, len(states))
    first = states[0]
    c = first.config
    P = max(positions)
    acc = [torch.zeros(t.shape, dtype=torch.float64, device=first.device) for t in first.layers]
    for s, n, wi in zip(states, positions, w, strict=True):
        if wi == 0.0:
            continue
        shift = torch.tensor([P - n], dtype=torch.long, device=first.device)
        for a, t in zip(acc, s.layers, strict=True):
            a.add_(_rotate(t, shift, c.head_k_dim, c.rope_theta), alpha=wi)
    out = [t.to(first.dtype) for t in acc]
    return RetentionState(out, torch.tensor([P], dtype=torch.long, device=first.device), c)
