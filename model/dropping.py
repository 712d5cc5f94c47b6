"""Token dropping at prefill: read a long prompt but write only some of its tokens into the upper layers.

A `DropSpec` names a policy and how much to keep. `keep_mask` turns per-token scores into a (B, T) keep
mask (pure); `prefill_dropping` runs the prompt through the model the *compact* way:

- layers below `from_layer` read every token (as usual);
- at layer `from_layer` the policy scores each token from that layer's input (its k and v projections);
- from layer `from_layer` on, the dropped tokens are removed from the sequence: the kept ones are
  processed alone, at their original positions (rotary at the original position, decay over the real
  gap, through `decay_steps` in `model.ops`), so upper layers cost in proportion to what is kept.

The result equals the keep-mask form `model(ids, keep=mask, keep_from_layer=from_layer)` (the last
kept token's logits and the final state; tests hold it to 1e-10 in float64, 1e-5 relative in float32):
a dropped token writes nothing to the upper layers' states, which still decay over it.

Policies (each keeps `count = max(ceil(keep * n), |forced|)` of a row's n real tokens, where the
forced ones are the first `sinks` tokens, the last `recent` tokens and always the last token; the
ceiling is taken with a 1e-9 tolerance, so keep=0.3 of 10 tokens keeps exactly 3; ties go to the
earlier token; pads are never kept nor counted):

- `recency`: the most recent tokens.
- `random`: a seeded baseline: uniform scores from `torch.Generator().manual_seed(seed)`, indexed by a
  token's index among its row's real tokens (so a row's mask depends only on its own length and seed).
- `norm`: sum over heads of ||k_h|| * ||v_h|| at the scoring layer (kv heads repeated for GQA).
- `decayed`: sum over heads of gamma_h^(n-1-i) * ||k_h|| * ||v_h|| for the i-th of n real tokens: a
  bound on that token's contribution to the final state of each head. Computed as log-sum-exp in float64.

`sinks` count the first tokens *of this call's prompt* (for a fresh state, the sequence's first tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from model.config import RetNetConfig
from model.ops import compute_dtype, retention_log_decay
from model.retnet import RetNet, token_positions
from model.state import RetentionState

__all__ = ["POLICIES", "DropResult", "DropSpec", "keep_mask", "prefill_dropping", "token_scores"]

POLICIES = ("decayed", "norm", "recency", "random")
_SCORED = ("decayed", "norm")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class DropSpec:
    """What to drop: `policy` in POLICIES, `keep` the fraction of each prompt kept (0 < keep <= 1)."""

    policy: str
    keep: float
    sinks: int = 4
    recent: int = 64
    from_layer: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        k = self.keep
        if not (_is_int(k) or isinstance(k, float)) or not math.isfinite(k) or not 0 < k <= 1:
            raise ValueError(f"keep must be a number with 0 < keep <= 1 (the fraction kept), got {k!r}")
        for name in ("sinks", "recent", "from_layer", "seed"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.seed >= 2**63:
            raise ValueError(f"seed must be < 2**63, got {self.seed}")

    def check(self, config: RetNetConfig) -> None:
        """Raise ValueError unless `from_layer` exists in a model with this config."""
        L = config.num_hidden_layers
        if self.from_layer >= L:
            raise ValueError(
                f"from_layer must be in [0, {L - 1}] for this {L}-layer model, got {self.from_layer}"
            )


@dataclass
class DropResult:
    logits: Tensor  # (B, V): the last real token of each row
    state: RetentionState
    keep: Tensor  # (B, T) bool: tokens written into layers >= from_layer (pads False)
    dropped: Tensor  # (B,) int64: real tokens dropped per row


def kept_count(keep: float, n: Tensor) -> Tensor:
    """ceil(keep * n) per row (with a 1e-9 tolerance), n: (B,) int64 real tokens."""
    return torch.ceil(n.double() * keep - 1e-9).long().clamp(min=0).minimum(n)


def token_scores(policy: str, k: Tensor, v: Tensor, attention_mask: Tensor | None, num_heads: int) -> Tensor:
    """Log-scores (B, T) float64 of the `norm` or `decayed` policy; higher = more worth keeping.

    k: (B, T, H_kv, Dk), v: (B, T, H_kv, Dv) the scoring layer's projections (rotary does not change
    norms); attention_mask: (B, T) or None.
    """
    if policy not in _SCORED:
        raise ValueError(f"token_scores is for the {_SCORED} policies, got {policy!r}")
    dt = compute_dtype(k.dtype)  # norms: float32 is plenty to rank
    log_kv = k.to(dt).norm(dim=-1).double().log() + v.to(dt).norm(dim=-1).double().log()  # (B, T, H_kv)
    if log_kv.shape[-1] != num_heads:
        log_kv = log_kv.repeat_interleave(num_heads // log_kv.shape[-1], dim=-1)  # (B, T, H)
    if policy == "decayed":
        B, T = k.shape[:2]
        real = (
            torch.ones(B, T, dtype=torch.bool, device=k.device) if attention_mask is None else attention_mask
        )
        idx = real.long().cumsum(-1)  # (B, T): 1-based index among real tokens
        dist = (idx[:, -1:] - idx).double()  # (B, T): real tokens after this one
        log_kv = log_kv + dist[..., None] * retention_log_decay(num_heads, k.device)  # (B, T, H)
    return torch.logsumexp(log_kv, dim=-1)  # (B, T)


def keep_mask(
    spec: DropSpec,
    scores: Tensor | None,
    attention_mask: Tensor | None,
    T: int,
    *,
    batch_size: int | None = None,
) -> Tensor:
    """The (B, T) bool keep mask of `spec` (see the module docstring for the counts).

    scores: (B, T) float, higher kept first (needed by `norm` / `decayed`, ignored otherwise);
    attention_mask: (B, T), 1 = token, 0 = pad, or None. B comes from scores, the mask or batch_size.
    """
    shaped = scores if scores is not None else attention_mask
    if shaped is not None:
        if shaped.ndim != 2 or shaped.shape[1] != T:
            raise ValueError(f"scores / attention_mask must have shape (B, {T}), got {tuple(shaped.shape)}")
        B, device = shaped.shape[0], shaped.device
    else:
        B, device = (1 if batch_size is None else batch_size), torch.device("cpu")
    if spec.policy in _SCORED and scores is None:
        raise ValueError(f"policy {spec.policy!r} needs scores")
    real = (
        torch.ones(B, T, dtype=torch.bool, device=device)
        if attention_mask is None
        else attention_mask.to(device).bool()
    )
    if real.shape != (B, T) or (scores is not None and scores.shape != (B, T)):
        raise ValueError("scores and attention_mask must have the same (B, T) shape")
    n = real.long().sum(-1)  # (B,)
    idx = real.long().cumsum(-1) - 1  # (B, T): index among the row's real tokens
    from_end = n[:, None] - 1 - idx
    forced = real & ((idx < spec.sinks) | (from_end < max(spec.recent, 1)))
    if spec.policy == "recency":
        score = idx.double()
    elif spec.policy == "random":
        u = torch.rand(T, generator=torch.Generator().manual_seed(spec.seed), dtype=torch.float64)
        score = u.to(device)[idx.clamp(min=0)]
    else:
        assert scores is not None
        score = scores.to(device).double()
    big = torch.finfo(torch.float64).max
    score = torch.nan_to_num(score, nan=-big, posinf=big, neginf=-big)
    score = score.masked_fill(forced, math.inf).masked_fill(~real, -math.inf)
    count = torch.maximum(kept_count(spec.keep, n), forced.long().sum(-1))  # (B,)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # (B, T)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=device).expand(B, T))
    return (rank < count[:, None]) & real


def _take(t: Tensor, flat: Tensor, B: int) -> Tensor:
    """Rows `flat` (indices into the flattened (B * T) leading axes) of t (B, T, ...) -> (B, Tc, ...)."""
    return t.reshape(-1, *t.shape[2:]).index_select(0, flat).view(B, -1, *t.shape[2:])


def _last_real(mask: Tensor | None, B: int, T: int, device: torch.device) -> Tensor:
    """Index (B,) of each row's last real token."""
    if mask is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=device)
    ar = torch.arange(T, device=device).expand(B, T)
    return torch.where(mask, ar, -1).amax(-1)


def _full_prefill(
    model: RetNet,
    input_ids: Tensor,
    state: RetentionState | None,
    attention_mask: Tensor | None,
    mask: Tensor | None,
    chunk_size: int,
) -> DropResult:
    """keep = 1: exactly the normal forward."""
    B, T = input_ids.shape
    if mask is None or bool(mask[:, -1].all()):
        logits, new_state = model(
            input_ids, state, attention_mask, chunk_size=chunk_size, logits_to_keep=1
        )  # (B, 1, V)
        last = logits[:, -1]
    else:
        logits, new_state = model(input_ids, state, attention_mask, chunk_size=chunk_size)  # (B, T, V)
        last = logits[torch.arange(B, device=logits.device), _last_real(mask, B, T, logits.device)]
    real = torch.ones(B, T, dtype=torch.bool, device=model.device) if mask is None else mask
    return DropResult(last, new_state, real, torch.zeros(B, dtype=torch.long, device=model.device))


@torch.no_grad()
def prefill_dropping(
    model: RetNet,
    input_ids: Tensor,  # (B, T) int64
    spec: DropSpec,
    state: RetentionState | None = None,
    attention_mask: Tensor | None = None,  # (B, T), 1 = token, 0 = pad
    chunk_size: int = 64,
) -> DropResult:
    """Read a prompt dropping tokens from layer `spec.from_layer` on, the compact way (module docstring).

    Rows may start from a saved state (positions continue from `state.position`) and be padded (left,
    right or holes). Every row needs at least one real token. keep == 1 is the plain forward, bit for bit.
    """
    if not isinstance(spec, DropSpec):
        raise ValueError(f"spec must be a DropSpec, got {type(spec).__name__}")
    spec.check(model.config)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    state, mask = model.check_inputs(input_ids, state, attention_mask)
    B, T = input_ids.shape
    device = model.device
    if T == 0:
        raise ValueError("prefill_dropping needs at least one token per row, got an empty prompt")
    if mask is not None and not bool(mask.any(-1).all()):
        raise ValueError("every row needs at least one real token (attention_mask has an all-pad row)")
    if spec.keep >= 1:
        return _full_prefill(model, input_ids, state, attention_mask, mask, chunk_size)

    real = torch.ones(B, T, dtype=torch.bool, device=device) if mask is None else mask
    positions, new_position = token_positions(state.position.to(device), mask, T)  # (B, T), (B,)
    x = model.model.embeddings(input_ids.to(device))  # (B, T, D)
    rope = model.rotary(positions, x.dtype)
    L = spec.from_layer
    layers = model.model.layers
    new_layers: list[Tensor] = []
    for i in range(L):
        x, s = layers[i](x, state.layers[i], rope, mask, None, "chunk", chunk_size)
        new_layers.append(s)

    kv = None
    if spec.policy in _SCORED:
        kv = layers[L].attn.project_kv(layers[L].attn_norm(x))  # (B, T, H_kv, Dk), (B, T, H_kv, Dv)
        scores = token_scores(spec.policy, kv[0], kv[1], mask, model.config.num_heads)
        keep = keep_mask(spec, scores, mask, T)
    else:
        keep = keep_mask(spec, None, mask, T, batch_size=B).to(device)
    dropped = (real & ~keep).long().sum(-1)  # (B,)

    if not bool(dropped.any()):  # nothing to drop: carry on with the whole sequence
        cmask, ctx, crope, steps = mask, x, rope, None
        last = _last_real(mask, B, T, device)
    else:
        K = keep.long().sum(-1)  # (B,) kept per row
        Tc = int(K.max())
        idx = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[:, :Tc]  # (B, Tc)
        cmask = torch.arange(Tc, device=device)[None] < K[:, None]  # (B, Tc)
        flat = (idx + torch.arange(B, device=device)[:, None] * T).flatten()  # (B * Tc,)
        cpos = _take(positions, flat, B)  # (B, Tc) original positions
        prev = torch.cat([state.position.to(device)[:, None] - 1, cpos[:, :-1]], 1)
        steps = (cpos - prev).masked_fill(~cmask, 0)  # (B, Tc): the real gap before each kept token
        ctx = _take(x, flat, B)  # (B, Tc, D)
        crope = model.rotary(cpos, x.dtype)
        if kv is not None:
            kv = (_take(kv[0], flat, B), _take(kv[1], flat, B))
        if bool(cmask.all()):
            cmask = None
        last = K - 1
    for i in range(L, len(layers)):
        ctx, s = layers[i](
            ctx, state.layers[i], crope, cmask, None, "chunk", chunk_size, steps, kv if i == L else None
        )
        new_layers.append(s)
    h = ctx[torch.arange(B, device=device), last]  # (B, D)
    logits = model.lm_head(model.model.norm(h))  # (B, V)
    return DropResult(logits, RetentionState(new_layers, new_position, model.config), keep, dropped)
