"""GPT-style Transformer baseline (causal softmax attention + KV cache) for RetNet comparisons.

Same ingredients as the RetNet where they are not the point of the comparison: RMSNorm pre-norm,
half-split rotary, SwiGLU MLP, untied embeddings. `preset("small")` matches RetNet's `small` parameter
count exactly (RetNet's retention has 8·D² weights per layer, attention 4·D², so the MLP is wider).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ConfigError
from model.layers import RMSNorm, Rotary

MODEL_TYPE = "gpt-baseline"


@dataclass
class TransformerConfig:
    vocab_size: int = 8192
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = MODEL_TYPE
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model_type != MODEL_TYPE:
            raise ConfigError(f"model_type must be {MODEL_TYPE!r}, got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "intermediate_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ConfigError("hidden_size / num_heads must be an even integer (rotary head dim)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d, "architectures": ["GPTBaselineForCausalLM"]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in data.items() if k in names},
            extra={k: v for k, v in data.items() if k not in names},
        )


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=107),
    "small": dict(vocab_size=8192, hidden_size=192, num_hidden_layers=4, num_heads=4, intermediate_size=512),
}


def preset(name: str, **overrides: Any) -> TransformerConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown transformer preset {name!r}; choose one of {sorted(PRESETS)}")
    return TransformerConfig(**{**PRESETS[name], **overrides})


@dataclass
class KVCache:
    """Per layer keys and values (B, H, max_len, Dh), filled up to `length` (all rows in step)."""

    k: list[Tensor]
    v: list[Tensor]
    length: int = 0

    @classmethod
    def empty(
        cls, config: TransformerConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32
    ) -> KVCache:
        shape = (batch_size, config.num_heads, max_len, config.head_dim)
        n = config.num_hidden_layers
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
        )


class Attention(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.o_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor, rope: Rotary, cache: KVCache | None, layer: int) -> Tensor:
        B, T, _ = x.shape
        q = rope.rotate(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).to(x.dtype)
        k = rope.rotate(self.k_proj(x).view(B, T, self.num_heads, self.head_dim)).to(x.dtype)
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        if cache is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start, end = cache.length, cache.length + T
            if end > cache.k[layer].shape[2]:
                raise ValueError(f"KV cache holds {cache.k[layer].shape[2]} positions; {end} needed")
            cache.k[layer][:, :, start:end] = k
            cache.v[layer][:, :, start:end] = v
            kk, vv = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
            if T == 1:
                o = F.scaled_dot_product_attention(q, kk, vv)
            else:  # causal with an offset: query i sees keys j <= start + i
                allowed = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.attn = Attention(c)
        self.mlp_norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor, rope: Rotary, cache: KVCache | None, layer: int) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, layer)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class GPTBaseline(nn.Module):
    """`forward(input_ids, cache=None, logits_to_keep=0) -> (logits, cache)`; updates the cache in place."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=config.initializer_range)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, input_ids: Tensor, cache: KVCache | None = None, logits_to_keep: int = 0
    ) -> tuple[Tensor, KVCache | None]:
        B, T = input_ids.shape
        start = 0 if cache is None else cache.length
        positions = (start + torch.arange(T, device=input_ids.device)).expand(B, T)
        x = self.embeddings(input_ids)  # (B, T, D)
        rope = Rotary(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache, i)
        if cache is not None:
            cache.length += T
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.norm(x)), cache
