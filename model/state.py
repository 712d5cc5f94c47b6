"""RetentionState: the whole memory of a batch of sequences, a fixed size whatever their length."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.config import RetNetConfig


class StateMismatchError(ValueError):
    """A state does not belong to this model, or states that should be combined do not fit together."""


@dataclass
class RetentionState:
    """Per layer a (B, H, head_k_dim, head_v_dim) float32 tensor, plus tokens seen per row (B,).

    Rows are independent: any set of sessions, whatever their positions, can be stacked into one
    batch, run, and split again.
    """

    layers: list[Tensor]  # num_hidden_layers x (B, H, Dk, Dv)
    position: Tensor  # (B,) int64: tokens read by each row (its next token's index)
    config: RetNetConfig

    def __post_init__(self) -> None:
        self.check(self.config)

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def empty(
        cls,
        config: RetNetConfig,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> RetentionState:
        shape = config.state_shape(batch_size)
        layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        return cls(layers, torch.zeros(batch_size, dtype=torch.long, device=device), config)

    # ---- properties --------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.position.shape[0])

    @property
    def device(self) -> torch.device:
        return self.position.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)

    def check(self, config: RetNetConfig) -> None:
        """Raise StateMismatchError unless this state fits a model with `config`."""
        if self.config is not config and self.config.fingerprint_dict() != config.fingerprint_dict():
            raise StateMismatchError("this state belongs to a model of another shape; it cannot be used here")
        if len(self.layers) != config.num_hidden_layers:
            raise StateMismatchError(
                f"state has {len(self.layers)} layers, the model has {config.num_hidden_layers}"
            )
        if self.position.ndim != 1 or self.position.dtype != torch.long:
            raise StateMismatchError("state position must be a 1-D int64 tensor (tokens seen per row)")
        expected = config.state_shape(self.batch_size)
        for i, t in enumerate(self.layers):
            if tuple(t.shape) != expected:
                raise StateMismatchError(f"layer {i} state has shape {tuple(t.shape)}, expected {expected}")
            if not t.is_floating_point():
                raise StateMismatchError(f"layer {i} state must be floating point, got {t.dtype}")

    # ---- row operations ----------------------------------------------------------------
    def select(self, rows: Sequence[int] | Tensor) -> RetentionState:
        """A new state holding the given rows (copies)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        return RetentionState([t.index_select(0, idx) for t in self.layers], self.position[idx], self.config)

    def split(self) -> list[RetentionState]:
        """One single-row state per row."""
        return [self.select([i]) for i in range(self.batch_size)]

    @classmethod
    def stack(cls, states: Sequence[RetentionState]) -> RetentionState:
        """Concatenate the rows of several states (any positions) into one batch."""
        if not states:
            raise ValueError("stack needs at least one state")
        first = states[0]
        for s in states[1:]:
            if s.config.fingerprint_dict() != first.config.fingerprint_dict():
                raise StateMismatchError("cannot stack states of models with different shapes")
            if s.dtype != first.dtype or s.device != first.device:
                raise StateMismatchError("cannot stack states of different dtypes or devices")
        layers = [torch.cat([s.layers[i] for s in states], 0) for i in range(len(first.layers))]
        return cls(layers, torch.cat([s.position for s in states], 0), first.config)

    def clone(self) -> RetentionState:
        return RetentionState([t.clone() for t in self.layers], self.position.clone(), self.config)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> RetentionState:
        return RetentionState(
            [t.to(device=device, dtype=dtype) for t in self.layers], self.position.to(device), self.config
        )

    def equal(self, other: RetentionState) -> bool:
        """Bit-for-bit equality of positions and tensors."""
        return (
            self.batch_size == other.batch_size
            and torch.equal(self.position.cpu(), other.position.cpu())
            and all(torch.equal(a, b) for a, b in zip(self.layers, other.layers, strict=True))
        )
