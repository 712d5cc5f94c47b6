"""RetNet causal LM: one module, three exactly equivalent forms, rows at any position."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from model.config import RetNetConfig
from model.layers import Mode, RetNetBlock, RMSNorm, Rotary
from model.ops import compute_dtype
from model.state import RetentionState

ForwardMode = Literal["auto", "parallel", "chunk", "recurrent"]


class RetNetBackbone(nn.Module):
    """Holds the `model.*` parameters (fla's RetNetModel)."""

    def __init__(self, config: RetNetConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([RetNetBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)


class RetNet(nn.Module):
    """`forward(input_ids, state, attention_mask, keep, mode) -> (logits, state)`.

    - `state`: a RetentionState (rows at any positions) or None for fresh sequences.
    - `attention_mask` (B, T): 1 = token, 0 = pad (left or right). Pads neither advance a row's
      position nor touch its state; their logits are meaningless.
    - `keep` (B, T) bool: False drops a token from the state (it writes nothing, the state still
      decays, later tokens keep their original positions).
    - `mode`: "parallel", "chunk", "recurrent", or "auto" (recurrent for T == 1, else chunk).
    - `logits_to_keep`: 0 = logits for every position, n > 0 = only for the last n positions.
    - `keep_from_layer`: the layer from which `keep` applies (default 0: all layers); the keep-mask
      form of `model.dropping.prefill_dropping`.
    """

    def __init__(self, config: RetNetConfig) -> None:
        super().__init__()
        self.config = config
        self.model = RetNetBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif hasattr(m, "weight") and isinstance(m.weight, nn.Parameter) and m.weight.ndim == 1:
                nn.init.ones_(m.weight)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def empty_state(self, batch_size: int) -> RetentionState:
        dt = compute_dtype(self.dtype)
        return RetentionState.empty(self.config, batch_size, device=self.device, dtype=dt)

    def check_inputs(
        self, input_ids: Tensor, state: RetentionState | None, attention_mask: Tensor | None
    ) -> tuple[RetentionState, Tensor | None]:
        """Validate a forward's inputs; return the state (a fresh one for None) and the bool mask."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if state is None:
            state = self.empty_state(B)
        else:
            state.check(self.config)
            if state.batch_size != B:
                raise ValueError(f"state has {state.batch_size} rows but input_ids has {B}")
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(
                    f"attention_mask must have shape {(B, T)}, got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.to(self.device).bool()
        return state, mask

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> Rotary:
        """Rotary tables for absolute token positions (B, T) int64."""
        return Rotary(positions, self.config.head_k_dim, self.config.rope_theta, dtype)

    def forward(
        self,
        input_ids: Tensor,  # (B, T) int64
        state: RetentionState | None = None,
        attention_mask: Tensor | None = None,  # (B, T), 1 = token, 0 = pad
        keep: Tensor | None = None,  # (B, T) bool
        mode: ForwardMode = "auto",
        chunk_size: int = 64,
        logits_to_keep: int = 0,
        keep_from_layer: int = 0,
    ) -> tuple[Tensor, RetentionState]:
        """keep_from_layer: `keep` applies to layers >= keep_from_layer only (lower ones read every token)."""
        state, mask = self.check_inputs(input_ids, state, attention_mask)
        B, T = input_ids.shape
        if keep is not None:
            if keep.shape != (B, T):
                raise ValueError(f"keep must have shape {(B, T)}, got {tuple(keep.shape)}")
            keep = keep.to(self.device).bool()
        L = self.config.num_hidden_layers
        if isinstance(keep_from_layer, bool) or not isinstance(keep_from_layer, int):
            raise ValueError(f"keep_from_layer must be an integer, got {keep_from_layer!r}")
        if not 0 <= keep_from_layer < L:
            raise ValueError(f"keep_from_layer must be in [0, {L - 1}], got {keep_from_layer}")
        layer_mode: Mode
        if mode == "auto":
            layer_mode = "recurrent" if T == 1 else "chunk"
        elif mode in ("parallel", "chunk", "recurrent"):
            layer_mode = mode
        else:
            raise ValueError(f"mode must be 'auto', 'parallel', 'chunk' or 'recurrent', got {mode!r}")

        positions, new_position = token_positions(state.position.to(self.device), mask, T)
        x = self.model.embeddings(input_ids)  # (B, T, D)
        rope = self.rotary(positions, x.dtype)
        new_layers = []
        for i, (layer, s) in enumerate(zip(self.model.layers, state.layers, strict=True)):
            layer_keep = keep if i >= keep_from_layer else None
            x, s = layer(x, s, rope, mask, layer_keep, layer_mode, chunk_size)
            new_layers.append(s)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.model.norm(x))  # (B, T', V)
        return logits, RetentionState(new_layers, new_position, self.config)


def token_positions(start: Tensor, mask: Tensor | None, T: int) -> tuple[Tensor, Tensor]:
    """Absolute positions (B, T) of a block of T tokens read by rows at `start` (B,), and the new positions.

    Pads (mask False) take their neighbour's position and do not advance the row.
    """
    if mask is None:
        positions = start[:, None] + torch.arange(T, device=start.device)  # (B, T)
        return positions, start + T
    seen = mask.long().cumsum(-1)  # (B, T)
    positions = start[:, None] + (seen - 1).clamp(min=0)
    return positions, (start + seen[:, -1] if T > 0 else start)
