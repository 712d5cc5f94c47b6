"""RetNet building blocks, parameter names as in fla's RetNet (`fla/models/retnet`)."""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import RetNetConfig
from model.ops import chunk_retention, compute_dtype, parallel_retention, recurrent_retention

Mode = Literal["parallel", "chunk", "recurrent"]


def _fp(x: Tensor) -> torch.dtype:
    """Computation dtype for numerically sensitive parts (ops.compute_dtype of x's dtype)."""
    return compute_dtype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (float64 for float64 inputs), cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        dt = _fp(x)
        h = x.to(dt)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.to(dt)).to(x.dtype)


class RMSNormSwishGate(nn.Module):
    """fla's FusedRMSNormGated: rmsnorm(o) * weight * swish(g), over the last dim (head_v_dim)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, o: Tensor, g: Tensor) -> Tensor:
        dt = _fp(o)
        o = o.to(dt)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(dt)
        return o * F.silu(g.to(dt))


@functools.lru_cache(maxsize=64)
def _inv_freq(dim: int, base: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():  # cached for inference and training alike
        return 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=dtype) / dim))


class Rotary:
    """Non-interleaved (half-split) rotary embedding tables for given positions, built once per forward.

    positions: (B, T) int64, each token's index in its own sequence. Angles are computed in float32
    as fla computes them (float64 for float64 models). Apply with `rotate(x)`, x: (B, T, H, D).
    """

    def __init__(self, positions: Tensor, dim: int, base: float, dtype: torch.dtype) -> None:
        dt = compute_dtype(dtype)
        angles = positions.to(dt)[..., None] * _inv_freq(dim, base, dt, positions.device)  # (B, T, D/2)
        self.cos = angles.cos().repeat(1, 1, 2)[:, :, None, :]  # (B, T, 1, D)
        self.sin = angles.sin().repeat(1, 1, 2)[:, :, None, :]
        self.dtype = dt

    def rotate(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * self.cos + torch.cat([-x2, x1], -1) * self.sin


class MultiScaleRetention(nn.Module):
    def __init__(self, config: RetNetConfig) -> None:
        super().__init__()
        c = config
        self.num_heads = c.num_heads
        self.kv_groups = c.num_heads // c.kv_heads
        self.head_k_dim, self.head_v_dim = c.head_k_dim, c.head_v_dim
        self.q_proj = nn.Linear(c.hidden_size, c.key_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.key_dim // self.kv_groups, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.value_dim // self.kv_groups, bias=False)
        self.g_proj = nn.Linear(c.hidden_size, c.value_dim, bias=False)
        self.o_proj = nn.Linear(c.value_dim, c.hidden_size, bias=False)
        self.g_norm_swish_gate = RMSNormSwishGate(c.head_v_dim, eps=c.norm_eps)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values before rotary: (B, T, H_kv, Dk) and (B, T, H_kv, Dv), x: (B, T, D)."""
        B, T, _ = x.shape
        return self.k_proj(x).view(B, T, -1, self.head_k_dim), self.v_proj(x).view(B, T, -1, self.head_v_dim)

    def forward(
        self,
        x: Tensor,  # (B, T, D)
        state: Tensor,  # (B, H, Dk, Dv)
        rope: Rotary,
        mask: Tensor | None,  # (B, T) bool
        keep: Tensor | None,  # (B, T) bool
        mode: Mode,
        chunk_size: int,
        decay_steps: Tensor | None = None,  # (B, T) int64: decay steps before each token (ops.py)
        kv: tuple[Tensor, Tensor] | None = None,  # project_kv(x), when already computed
    ) -> tuple[Tensor, Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_k_dim)
        k, v = self.project_kv(x) if kv is None else kv
        q, k = rope.rotate(q), rope.rotate(k)
        if self.kv_groups > 1:  # GQA: each kv head serves kv_groups consecutive query heads
            k = k.repeat_interleave(self.kv_groups, dim=2)
            v = v.repeat_interleave(self.kv_groups, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if mode == "recurrent":
            o, state = recurrent_retention(q, k, v, state, True, mask, keep, decay_steps=decay_steps)
        elif mode == "chunk":
            o, state = chunk_retention(
                q, k, v, state, True, mask, keep, chunk_size=chunk_size, decay_steps=decay_steps
            )
        elif mode == "parallel":
            o, state = parallel_retention(q, k, v, state, True, mask, keep, decay_steps=decay_steps)
        else:
            raise ValueError(f"mode must be 'parallel', 'chunk' or 'recurrent', got {mode!r}")
        g = self.g_proj(x).view(B, T, self.num_heads, self.head_v_dim)
        o = self.g_norm_swish_gate(o.transpose(1, 2), g)  # (B, T, H, Dv)
        o = self.o_proj(o.reshape(B, T, -1).to(x.dtype))
        return o, state


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, config: RetNetConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.ffn_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.ffn_size, bias=False)
        self.down_proj = nn.Linear(config.ffn_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RetNetBlock(nn.Module):
    def __init__(self, config: RetNetConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = MultiScaleRetention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(config)

    def forward(
        self,
        x: Tensor,
        state: Tensor,
        rope: Rotary,
        mask: Tensor | None,
        keep: Tensor | None,
        mode: Mode,
        chunk_size: int,
        decay_steps: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """kv: the attention's project_kv(attn_norm(x)) when the caller already has it."""
        h, state = self.attn(self.attn_norm(x), state, rope, mask, keep, mode, chunk_size, decay_steps, kv)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, state
