"""The fast one-token decode step (gpt-fast style): one isolated function for one token per row.

`FastDecoder(model)` snapshots a RetNet's weights into a decode-friendly layout:

- q, k, v and the output gate projections fused into one (D -> Hq*Dk + Hkv*Dk + Hkv*Dv + H*Dv)
  matmul per layer, the MLP's gate and up projections into one (D -> 2F) matmul;
- rotary angles computed once per step for all layers (positions x inverse frequencies, as
  `model.layers.Rotary` computes them), applied to q and k together, the half rotation as a roll
  with the sign folded into the sine table;
- the retention state decayed and written in place (`mul_`, `addcmul_`), positions advanced in place;
- no validation in the loop: the caller validates the batch once (`check_batch`) when it is formed.

`step(tokens (B,), layers, position) -> logits (B, V)` updates `layers` (L x (B, H, Dk, Dv)) and
`position` (B,) in place. It computes what `RetNet.forward(tokens[:, None], state, mode="recurrent")`
computes, in the same dtypes (norms, rotary, retention and state in `compute_dtype`; projections in
the model's dtype), equal to it within float rounding (tests/unit/test_fast_decode.py).

No weight is held twice: the fused matrices (q|k|v|g and gate|up) are built once and the model's own
q, k, v, g, gate and up weights become views into them (same values, so the model's other forms are
unchanged); the other weights (embeddings, output projections, norms in the compute dtype) are shared
as they are. A model whose parameters are replaced later (moved, cast, loaded) no longer shares them:
`shared` rebuilds the decoder when the model's parameters changed (the serving engine never changes
them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.layers import _inv_freq
from model.ops import _gamma, compute_dtype
from model.retnet import RetNet
from model.state import RetentionState

__all__ = ["FastDecoder"]


class FastDecoder(nn.Module):
    """The recurrent step of `model` for one token per row, with fused weights (module buffers, so that
    `torch.compile` with inductor's freezing can treat them as constants)."""

    def __init__(self, model: RetNet) -> None:
        super().__init__()
        c = model.config
        self.config = c
        self.H, self.Hkv = c.num_heads, c.kv_heads
        self.Dk, self.Dv = c.head_k_dim, c.head_v_dim
        self.eps = c.norm_eps
        self.scale = self.Dk**-0.5
        self.dtype = model.dtype
        self.cdt = compute_dtype(model.dtype)
        self.splits = [self.H * self.Dk + self.Hkv * self.Dk, self.Hkv * self.Dv, self.H * self.Dv]
        dev = model.device
        with torch.no_grad():
            self.register_buffer("embed", model.model.embeddings.weight.detach())
            self.register_buffer("final_norm", model.model.norm.weight.detach().to(self.cdt))
            self.register_buffer("lm_head", model.lm_head.weight.detach())
            self.register_buffer("inv_freq", _inv_freq(self.Dk, c.rope_theta, self.cdt, dev).clone())
            self.register_buffer("gamma", _gamma(self.H, self.cdt, dev)[0].clone())  # (H, 1, 1)
            self.layers = nn.ModuleList(_FusedLayer(block, self.cdt) for block in model.model.layers)

    @classmethod
    def shared(cls, model: RetNet) -> FastDecoder:
        """One decoder per model, rebuilt when the model's parameters changed since (moved, cast, copied,
        loaded or modified in place: the fused weights are copies taken when it is built)."""
        cached = model.__dict__.get("_retserve_fast_decoder")
        if cached is None or cached[0] != _signature(model):
            decoder = cls(model).eval()  # re-points the model's weights into its fused ones
            cached = (_signature(model), decoder)
            model.__dict__["_retserve_fast_decoder"] = cached
        return cached[1]

    def check_batch(self, tokens: Tensor, state: RetentionState) -> None:
        """Validate a batch once (shapes, dtypes, devices); `step` itself checks nothing."""
        state.check(self.config)
        B = state.batch_size
        if tokens.shape != (B,) or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be an int64 tensor of shape ({B},), got {tuple(tokens.shape)}")
        for t in state.layers:
            if t.dtype != self.cdt or t.device != self.embed.device:
                raise ValueError(
                    f"state must be {self.cdt} on {self.embed.device}, got {t.dtype} on {t.device}"
                )
        if tokens.device != self.embed.device or state.position.device != self.embed.device:
            raise ValueError("tokens and state must be on the model's device")

    def forward(self, tokens: Tensor, layers: list[Tensor], position: Tensor) -> Tensor:
        return self.step(tokens, layers, position)

    def step(self, tokens: Tensor, layers: list[Tensor], position: Tensor) -> Tensor:
        """One token per row: logits (B, V); `layers` and `position` advanced in place."""
        B = tokens.shape[0]
        angles = position.to(self.cdt)[:, None] * self.inv_freq  # (B, Dk/2), as Rotary computes them
        cos = angles.cos().repeat(1, 2)[:, None, :]  # (B, 1, Dk)
        sin = angles.sin()
        sin = torch.cat([-sin, sin], -1)[:, None, :]  # rotate_half's sign folded in
        x = F.embedding(tokens, self.embed)  # (B, D)
        for layer, s in zip(self.layers, layers, strict=True):
            x = layer(x, s, cos, sin, self.gamma, self.H, self.Hkv, self.Dk, self.Dv, self.scale, self.eps)
        position.add_(1)
        h = _rms(x, self.final_norm, self.eps)
        return F.linear(h, self.lm_head).view(B, -1)


def _signature(model: RetNet) -> tuple:
    return tuple((id(p), p.data_ptr(), _version(p), p.device, p.dtype) for p in model.parameters())


def _fuse(linears: list[nn.Linear]) -> Tensor:
    """The linears' weights stacked into one (sum of outs, in) matrix, and each linear's weight made a
    view into it (a slice of rows: contiguous), so the fused matrix is the only copy."""
    fused = torch.cat([m.weight.detach() for m in linears])
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = fused[start : start + n]
        start += n
    return fused


def _version(t: Tensor) -> int:
    """In-place modification counter; inference tensors have none (for weights created in inference
    mode the decoder is keyed on identity, device and dtype only)."""
    return -1 if t.is_inference() else t._version


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm in the compute dtype of `weight`, cast back to x's dtype (model.layers.RMSNorm), as one
    fused op."""
    return F.rms_norm(x.to(weight.dtype), weight.shape, weight, eps).to(x.dtype)


class _FusedLayer(nn.Module):
    def __init__(self, block: nn.Module, cdt: torch.dtype) -> None:
        super().__init__()
        a, m = block.attn, block.mlp
        self.register_buffer("attn_norm", block.attn_norm.weight.detach().to(cdt))
        self.register_buffer("qkvg", _fuse([a.q_proj, a.k_proj, a.v_proj, a.g_proj]))
        self.register_buffer("g_norm", a.g_norm_swish_gate.weight.detach().to(cdt))
        self.register_buffer("o_proj", a.o_proj.weight.detach())
        self.register_buffer("mlp_norm", block.mlp_norm.weight.detach().to(cdt))
        self.register_buffer("gate_up", _fuse([m.gate_proj, m.up_proj]))
        self.register_buffer("down", m.down_proj.weight.detach())

    def forward(
        self,
        x: Tensor,  # (B, D) model dtype
        s: Tensor,  # (B, H, Dk, Dv) compute dtype: updated in place
        cos: Tensor,  # (B, 1, Dk)
        sin: Tensor,  # (B, 1, Dk), signed
        gamma: Tensor,  # (H, 1, 1)
        H: int,
        Hkv: int,
        Dk: int,
        Dv: int,
        scale: float,
        eps: float,
    ) -> Tensor:
        B = x.shape[0]
        cdt = s.dtype
        qkvg = F.linear(_rms(x, self.attn_norm, eps), self.qkvg)  # (B, (H+Hkv)Dk + Hkv Dv + H Dv)
        qk, v, g = qkvg.split([(H + Hkv) * Dk, Hkv * Dv, H * Dv], -1)
        qk = qk.reshape(B, H + Hkv, Dk).to(cdt)
        qk = qk * cos + qk.roll(Dk // 2, -1) * sin  # rotary on q and k at once
        q = qk[:, :H] * scale  # (B, H, Dk)
        k = qk[:, H:]  # (B, Hkv, Dk)
        v = v.reshape(B, Hkv, Dv).to(cdt)
        if Hkv != H:  # GQA: kv head j serves query heads j*G .. j*G + G - 1
            G = H // Hkv
            k = k[:, :, None].expand(B, Hkv, G, Dk).reshape(B, H, Dk)
            v = v[:, :, None].expand(B, Hkv, G, Dv).reshape(B, H, Dv)
        s.mul_(gamma).addcmul_(k[..., None], v[..., None, :])  # S = gamma S + k^T v, in place
        o = torch.matmul(q[:, :, None, :], s).view(B, H, Dv)  # (B, H, Dv)
        o = F.rms_norm(o, self.g_norm.shape, self.g_norm, eps) * F.silu(g.reshape(B, H, Dv).to(cdt))
        x = x + F.linear(o.reshape(B, H * Dv).to(x.dtype), self.o_proj)
        gate, up = F.linear(_rms(x, self.mlp_norm, eps), self.gate_up).chunk(2, -1)
        return x + F.linear(F.silu(gate) * up, self.down)
