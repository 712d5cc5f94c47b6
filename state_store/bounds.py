"""How large a model's states and logits can get: the codec refuses states beyond it.

A retention state can only hold what the model writes into it (model/ops.py, model/layers.py): per
layer and head h, starting from zero, each read token does S <- gamma_h * S + k^T v (a pad does
nothing, a dropped token only decays), so

    ||S||_F <= sum_j gamma_h^j ||k|| ||v|| <= max||k|| * max||v|| / (1 - gamma_h)

(q carries the 1/sqrt(Dk) scale, not k). k = rotary(W_k,h x) with x = attn_norm(input) = g * u,
||u|| < sqrt(D) (RMSNorm: ||u||^2 = ||h||^2 / (||h||^2 / D + eps)), and rotary preserves norms, so
||k|| <= ||W_k,h diag(g)||_F * sqrt(D); v likewise (GQA: head h reads kv head h // groups).
The bound is closed under the model's update (gamma * B + ||k|| ||v|| <= B), so a state within it
stays within it whatever is read next, and averages of states (convex combinations) stay within it
too: an accepted state can always be saved again. Logits: |logit_v| = |W_v . (g_f * u)| <=
||W_v diag(g_f)|| * sqrt(D), whatever the state.

Frobenius norms (no SVD) make the bound loose (real states sit far below it: the figures are in the
tests) but cheap: one pass over the k, v and lm_head weights at load time. `safety` (default 1.1)
covers rounding: float32 / bfloat16 arithmetic and bfloat16 / float16 storage move a norm by < 1%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.config import RetNetConfig
from model.ops import compute_dtype, retention_log_decay
from state_store.errors import CorruptStateError

DEFAULT_SAFETY = 1.1
_ROWS_PER_CHUNK = 4096  # lm_head rows converted to float64 at a time


class StateBoundsError(CorruptStateError):
    """A state's (or logits') magnitude is beyond anything the loaded model can produce."""


@dataclass(frozen=True)
class StateBounds:
    """Per layer and head, the largest Frobenius norm a state can have; the largest |logit|.

    Both include the safety factor. Build with `state_bounds(model)`.
    """

    state_norm: Tensor  # (L, H) float64
    logits_abs: float
    safety: float

    def check_config(self, config: RetNetConfig) -> None:
        """ValueError unless these bounds have the shape of `config`'s states."""
        want = (config.num_hidden_layers, config.num_heads)
        if tuple(self.state_norm.shape) != want:
            raise ValueError(
                f"bounds are for {tuple(self.state_norm.shape)} (layers, heads), the config has {want};"
                " compute them with state_bounds(model) of the same model"
            )

    def check_layer(self, layer: int, t: Tensor, what: str = "the state") -> float:
        """Raise StateBoundsError if a head of layer `layer`'s state `t` (B, H, Dk, Dv) exceeds its
        bound (t must be finite); returns the largest norm / bound ratio seen."""
        acc = compute_dtype(t.dtype)  # float32: ~1e-6 relative
        norms = torch.linalg.vector_norm(t, dim=(-2, -1), dtype=acc).double()  # (B, H); inf beyond f32
        ratio = norms / self.state_norm[layer].to(norms.device)  # (B, H)
        worst = float(ratio.max()) if ratio.numel() else 0.0
        if worst > 1.0:
            b, h = divmod(int(ratio.argmax()), ratio.shape[1])
            norm = float(torch.linalg.vector_norm(t[b, h], dtype=torch.float64))  # finite even past f32
            bound = float(self.state_norm[layer, h])
            raise StateBoundsError(
                f"{what}: layer {layer} head {h} (row {b}) has norm {norm:.4g}, beyond the {bound:.4g}"
                f" this model can produce (x{norm / bound:.3g}); the state was altered or was not made"
                " by this model"
            )
        return worst

    def check_logits(self, logits: Tensor, what: str = "the logits") -> float:
        """Raise StateBoundsError if any |logit| of the finite (B, V) `logits` exceeds the bound;
        returns the largest |logit| / bound ratio."""
        peak = logits.abs().amax(dim=-1).double()  # (B,)
        worst = float(peak.max()) / self.logits_abs if peak.numel() else 0.0
        if worst > 1.0:
            b = int(peak.argmax())
            raise StateBoundsError(
                f"{what}: row {b} has a logit of magnitude {float(peak[b]):.4g}, beyond the"
                f" {self.logits_abs:.4g} this model can produce (x{worst:.3g}); the logits were altered or"
                " were not made by this model"
            )
        return worst


def _head_norms(weight: Tensor, gain: Tensor, heads: int) -> Tensor:
    """||W_h diag(g)||_F per head of a (heads * d, D) projection: (heads,) float64."""
    w = weight.detach().to("cpu", torch.float64) * gain  # (heads * d, D)
    return w.reshape(heads, -1).pow(2).sum(-1).sqrt()


def state_bounds(model: nn.Module, *, safety: float = DEFAULT_SAFETY) -> StateBounds:
    """The bounds of a loaded RetNet's states and logits (reads the k, v, norm and lm_head weights once)."""
    config = getattr(model, "config", None)
    if not isinstance(config, RetNetConfig) or not hasattr(model, "lm_head"):
        raise TypeError(f"state_bounds needs a RetNet, got {type(model).__name__}")
    if not (math.isfinite(safety) and safety >= 1.0):
        raise ValueError(f"safety must be a finite factor >= 1, got {safety!r}")
    H, kv = config.num_heads, config.kv_heads
    root_d = math.sqrt(config.hidden_size)
    inv_one_minus_gamma = 1.0 / -torch.expm1(retention_log_decay(H))  # (H,) float64: 2^(5+h)
    rows = []
    with torch.no_grad():
        for layer in model.model.layers:
            g = layer.attn_norm.weight.detach().to("cpu", torch.float64)  # (D,)
            k_max = _head_norms(layer.attn.k_proj.weight, g, kv) * root_d  # (kv,)
            v_max = _head_norms(layer.attn.v_proj.weight, g, kv) * root_d
            groups = H // kv
            kv_prod = (k_max * v_max).repeat_interleave(groups)  # (H,)
            rows.append(kv_prod * inv_one_minus_gamma * safety)
        gf = model.model.norm.weight.detach().to("cpu", torch.float64)  # (D,)
        w = model.lm_head.weight
        peak = 0.0
        for start in range(0, w.shape[0], _ROWS_PER_CHUNK):
            chunk = w[start : start + _ROWS_PER_CHUNK].detach().to("cpu", torch.float64) * gf  # (n, D)
            peak = max(peak, float(chunk.pow(2).sum(-1).sqrt().max()))
    state_norm = torch.stack(rows)  # (L, H)
    if not bool(torch.isfinite(state_norm).all()) or not math.isfinite(peak):
        raise ValueError("the model's weights are not finite: no bounds can be derived")
    return StateBounds(state_norm, peak * root_d * safety, float(safety))
