"""Retention ops: pure functions `(q, k, v, initial_state, ...) -> (o, final_state)`.

All forms compute, per head h with decay gamma_h = 1 - 2^(-5-h) and state S of shape (Dk, Dv):

    S_t = gamma^{m_t} * S_{t-1} + w_t * k_t^T v_t,      o_t = (scale * q_t) S_t

where m_t = mask[b, t] (0 for a pad: the step neither decays nor writes the state) and
w_t = mask[b, t] & keep[b, t] (a dropped token still decays the state but writes nothing).
`decay_steps` (B, T) int >= 0 generalises m_t to any number of decay steps before token t (times
the mask: pads still take 0): a sequence compacted by removing tokens passes the real position gaps,
p_t - p_{t-1}, and gets exactly the state of the full sequence with those tokens not written.
With c_t = sum_{s<=t} m_s this unrolls to the parallel form

    o_i = sum_{j<=i} gamma^{c_i - c_j} w_j (q_i . k_j) v_j + gamma^{c_i} q_i S_0.

`naive_retention` is the reference (a plain loop, float64); `parallel_retention`,
`chunk_retention` and `recurrent_retention` are the fast paths tested against it.
Shapes: q, k (B, H, T, Dk); v (B, H, T, Dv); states (B, H, Dk, Dv); mask, keep (B, T) bool;
decay_steps (B, T) int64.
Computation (and the state) is float32, or float64 when the inputs are float64; `o` is returned
in the input dtype.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = [
    "chunk_retention",
    "naive_retention",
    "parallel_retention",
    "recurrent_retention",
    "retention_log_decay",
]


def retention_log_decay(num_heads: int, device: torch.device | str | None = None) -> Tensor:
    """log(gamma_h) for h in [0, H): gamma_h = 1 - 2^(-5-h). Float64, shape (H,). Do not modify."""
    return _log_decay(num_heads, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=64)
def _log_decay(num_heads: int, device: torch.device) -> Tensor:
    # Built outside inference mode so that the cached tensor also serves training.
    with torch.inference_mode(False), torch.no_grad():
        h = torch.arange(num_heads, dtype=torch.float64, device=device)
        return torch.log1p(-torch.pow(2.0, -5.0 - h))


@functools.lru_cache(maxsize=64)
def _gamma(num_heads: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return torch.exp(_log_decay(num_heads, device)).to(dtype)[None, :, None, None]  # (1, H, 1, 1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The one rule for numerically sensitive work (retention, norms, rotary angles, states):
    float64 for float64 models, float32 for everything else (fp32, bf16, fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None,
    mask: Tensor | None,
    keep: Tensor | None,
    scale: float | None,
    decay_steps: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Cast to the compute dtype, scale q, zero k where nothing is written; return (q, k, v, S0, steps).

    steps: None (every token takes one decay step), (B, T) bool (the mask) or (B, T) int64 (decay_steps
    times the mask)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if k.shape != (B, H, T, Dk) or v.shape[:3] != (B, H, T):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not match")
    dt = compute_dtype(q.dtype)
    scale = Dk**-0.5 if scale is None else scale
    q = q.to(dt) * scale
    k = k.to(dt)
    v = v.to(dt)
    if initial_state is None:
        s0 = q.new_zeros(B, H, Dk, Dv)
    else:
        if initial_state.shape != (B, H, Dk, Dv):
            raise ValueError(
                f"initial_state has shape {tuple(initial_state.shape)}, expected {(B, H, Dk, Dv)}"
            )
        s0 = initial_state.to(dt)
    for name, m in (("mask", mask), ("keep", keep), ("decay_steps", decay_steps)):
        if m is not None and m.shape != (B, T):
            raise ValueError(f"{name} has shape {tuple(m.shape)}, expected {(B, T)}")
    write = None
    if mask is not None:
        write = mask.bool()
    if keep is not None:
        write = keep.bool() if write is None else write & keep.bool()
    if write is not None:
        k = k * write[:, None, :, None].to(dt)
    steps = None if mask is None else mask.bool()
    if decay_steps is not None:
        if decay_steps.is_floating_point() or decay_steps.dtype == torch.bool:
            raise ValueError(f"decay_steps must be an integer tensor, got {decay_steps.dtype}")
        if decay_steps.numel() and int(decay_steps.min()) < 0:
            raise ValueError("decay_steps must be >= 0 (the number of decay steps before each token)")
        steps = decay_steps.long() if steps is None else decay_steps.long() * steps
    return q, k, v, s0, steps


def naive_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    mask: Tensor | None = None,
    keep: Tensor | None = None,
    scale: float | None = None,
    decay_steps: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Reference: the recurrence written out token by token, row by row, in float64."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    gamma = torch.exp(retention_log_decay(H, q.device))  # (H,)
    f64 = torch.float64
    o = torch.zeros(B, H, T, Dv, dtype=f64, device=q.device)
    S = (
        torch.zeros(B, H, Dk, Dv, dtype=f64, device=q.device)
        if initial_state is None
        else initial_state.to(f64).clone()
    )
    for b in range(B):
        for t in range(T):
            m = True if mask is None else bool(mask[b, t])
            w = m and (True if keep is None else bool(keep[b, t]))
            n = (1 if decay_steps is None else int(decay_steps[b, t])) if m else 0
            if n:
                S[b] = gamma[:, None, None] ** n * S[b]
            if w:
                S[b] = S[b] + k[b, :, t, :, None].to(f64) * v[b, :, t, None, :].to(f64)
            o[b, :, t] = torch.einsum("hk,hkv->hv", q[b, :, t].to(f64) * scale, S[b])
    final = S.to(compute_dtype(q.dtype)) if output_final_state else None
    return o.to(q.dtype), final


def _decay_block(
    log_gamma: Tensor, counts: Tensor | None, T: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Decay factors for one block of T steps (or several blocks at once).

    counts: (*lead, T) int, cumulative number of advancing steps within the block, or None when every
    step advances (then counts = 1..T and the factors are shared across the batch). lead is (B,) for
    one block per row, (B, G) for G blocks per row.
    Returns (D, q_decay, k_decay):
      D       (*lead|1, H, T, T)  gamma^{c_i - c_j} for j <= i, else 0
      q_decay (*lead|1, H, T, 1)  gamma^{c_i}          (applied to q for the initial-state term)
      k_decay (*lead|1, H, T, 1)  gamma^{c_T - c_j}    (applied to k for the final state)
    """
    device = log_gamma.device
    if counts is None:
        counts = torch.arange(1, T + 1, device=device)[None]  # (1, T)
    c = counts.to(torch.float64)[..., None, :]  # (*lead, 1, T)
    lg = log_gamma[:, None]  # (H, 1)
    diff = c[..., :, None] - c[..., None, :]  # (*lead, 1, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    D = torch.exp(diff * lg[..., None]).masked_fill(~causal, 0.0)
    q_decay = torch.exp(c * lg)[..., None]
    k_decay = torch.exp((c[..., -1:] - c) * lg)[..., None]
    return D.to(dtype), q_decay.to(dtype), k_decay.to(dtype)


_GROUP_ELEMENTS = 1 << 22  # decay factors of this many (B, H, n, n) entries are built in one go


class _ChunkDecays:
    """Per-row decay factors of the chunks of a masked / gapped sequence, built a group of chunks at a
    time (one set of tensor ops per group instead of per chunk; the values are those of _decay_block)."""

    def __init__(self, log_gamma: Tensor, steps: Tensor, chunk_size: int, dtype: torch.dtype) -> None:
        B, T = steps.shape
        self.log_gamma, self.cs, self.dtype = log_gamma, chunk_size, dtype
        counts = steps.long().cumsum(-1)  # (B, T)
        self.padded = torch.nn.functional.pad(counts, (1, 0))  # (B, T + 1): counts before each token
        self.full = T // chunk_size  # complete chunks
        per_chunk = B * log_gamma.shape[0] * chunk_size * chunk_size
        self.group = max(1, min(16, _GROUP_ELEMENTS // per_chunk))
        self.cached: tuple[int, tuple[Tensor, Tensor, Tensor]] | None = None

    def local(self, start: int, end: int) -> Tensor:
        """Counts within the chunk(s) [start, end): (B, end - start)."""
        return self.padded[:, start + 1 : end + 1] - self.padded[:, start : start + 1]

    def __call__(self, index: int, start: int, end: int) -> tuple[Tensor, Tensor, Tensor]:
        cs = self.cs
        if index >= self.full:  # the last, shorter chunk
            return _decay_block(self.log_gamma, self.local(start, end), end - start, self.dtype)
        g = index // self.group
        if self.cached is None or self.cached[0] != g:
            c0, c1 = g * self.group, min((g + 1) * self.group, self.full)
            B = self.padded.shape[0]
            local = self.padded[:, c0 * cs + 1 : c1 * cs + 1].view(B, c1 - c0, cs)
            local = local - self.padded[:, c0 * cs : c1 * cs : cs, None]  # (B, G, cs)
            self.cached = (g, _decay_block(self.log_gamma, local, cs, self.dtype))  # (B, G, H, ...)
        i = index - g * self.group
        D, qd, kd = self.cached[1]
        return D[:, i], qd[:, i], kd[:, i]


def _parallel_block(
    q: Tensor, k: Tensor, v: Tensor, s0: Tensor, decay: tuple[Tensor, Tensor, Tensor], final: bool
) -> tuple[Tensor, Tensor | None]:
    """One block in parallel form on prepared inputs (q scaled, k zeroed where not written)."""
    D, q_decay, k_decay = decay
    scores = torch.matmul(q, k.transpose(-1, -2)) * D  # (B, H, T, T)
    o = torch.matmul(scores, v) + torch.matmul(q * q_decay, s0)  # (B, H, T, Dv)
    s = None
    if final:
        # gamma^{c_T} S_0 = q_decay at the last step (when T > 0)
        s = q_decay[..., -1:, :] * s0 + torch.matmul((k * k_decay).transpose(-1, -2), v)
    return o, s


def parallel_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    mask: Tensor | None = None,
    keep: Tensor | None = None,
    scale: float | None = None,
    decay_steps: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Parallel form O = (Q K^T ⊙ D) V + (Q ⊙ gamma^c) S_0 over the whole sequence (O(T^2) memory)."""
    in_dtype = q.dtype
    q, k, v, s0, steps = _prepare(q, k, v, initial_state, mask, keep, scale, decay_steps)
    T = q.shape[2]
    if T == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]).to(in_dtype), (s0 if output_final_state else None)
    log_gamma = retention_log_decay(q.shape[1], q.device)
    counts = None if steps is None else steps.long().cumsum(-1)
    decay = _decay_block(log_gamma, counts, T, q.dtype)
    o, s = _parallel_block(q, k, v, s0, decay, output_final_state)
    return o.to(in_dtype), s


def chunk_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    mask: Tensor | None = None,
    keep: Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    decay_steps: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise form: the parallel form inside chunks of `chunk_size`, the state carried between them.

    Per chunk: O = (Q K^T ⊙ D) V + (Q ⊙ gamma^{j+1}) S;  S <- gamma^c S + (K ⊙ gamma^{c-1-j})^T V
    (with pads counted out of the exponents). Memory is O(T * chunk_size).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    in_dtype = q.dtype
    q, k, v, s, steps = _prepare(q, k, v, initial_state, mask, keep, scale, decay_steps)
    T = q.shape[2]
    log_gamma = retention_log_decay(q.shape[1], q.device)
    if steps is not None and steps.dtype != torch.bool and T > 0:
        factored = _chunk_factored(q, k, v, s, steps, log_gamma, chunk_size, output_final_state)
        if factored is not None:
            return factored[0].to(in_dtype), factored[1]
    full_decay = None if steps is not None else _decay_block(log_gamma, None, min(chunk_size, T), q.dtype)
    row_decays = None if steps is None else _ChunkDecays(log_gamma, steps, chunk_size, q.dtype)
    outs = []
    for index, start in enumerate(range(0, T, chunk_size)):
        end = min(start + chunk_size, T)
        n = end - start
        if row_decays is None:
            decay = full_decay if n == chunk_size else _decay_block(log_gamma, None, n, q.dtype)
        else:
            decay = row_decays(index, start, end)
        is_last = end == T
        o, s_next = _parallel_block(
            q[:, :, start:end],
            k[:, :, start:end],
            v[:, :, start:end],
            s,
            decay,
            (not is_last) or output_final_state,
        )
        outs.append(o)
        s = s_next
    o = torch.cat(outs, dim=2) if outs else q.new_zeros(*q.shape[:3], v.shape[-1])
    return o.to(in_dtype), (s if output_final_state else None)


# Largest |exponent| the factored form lets a decay factor reach (exp overflows beyond ~88 / ~709).
# Above the diagonal a_i * b_j may still overflow: those entries are masked out, never multiplied.
_FACTOR_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}


def _chunk_factored(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: Tensor,
    steps: Tensor,
    log_gamma: Tensor,
    chunk_size: int,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None] | None:
    """Chunk form for per-token decay steps with the decay matrix factored, D_ij = a_i * b_j.

    With c the steps counted from the chunk's start and m half the chunk's total,
    gamma^(c_i - c_j) = gamma^(c_i - m) * gamma^(m - c_j): the factors go into q and k for the whole
    sequence at once, and each chunk needs only matmuls and the causal mask (no (T, T) exponentials,
    which cost as much as the retention itself). Returns None, for the caller to use the exact
    per-chunk form, when a chunk spans so many steps that a factor could overflow.
    Inputs are prepared (q scaled, k zeroed where nothing is written); steps (B, T) int64.
    """
    T = q.shape[2]
    dt, dev, cs = q.dtype, q.device, chunk_size
    counts = steps.cumsum(-1)  # (B, T)
    before = torch.nn.functional.pad(counts, (1, 0))  # (B, T + 1): counts before each token
    pos = torch.arange(T, device=dev)
    start = (pos // cs) * cs  # (T,) each token's chunk start
    last = torch.clamp(start + cs, max=T) - 1  # (T,) and its chunk's last token
    base = before[:, start]  # (B, T)
    c = (counts - base).to(torch.float64)  # (B, T): steps since the chunk's start
    c_end = (counts[:, last] - base).to(torch.float64)  # (B, T): the chunk's total
    lg = log_gamma[None, :, None]  # (1, H, 1)
    if float(c_end.max()) * float(-log_gamma.min()) / 2 > _FACTOR_LIMIT[dt]:
        return None
    half = (c_end / 2)[:, None]  # (B, 1, T)
    c3, c_end3 = c[:, None], c_end[:, None]
    a = torch.exp((c3 - half) * lg).to(dt)[..., None]  # (B, H, T, 1)
    b = torch.exp((half - c3) * lg).to(dt)[..., None]
    qd = torch.exp(c3 * lg).to(dt)[..., None]  # gamma^c: the initial state's decay at each token
    kd = torch.exp((c_end3 - c3) * lg).to(dt)[..., None]  # gamma^(c_end - c): to the chunk's end
    qa, kb, qq, kk = q * a, k * b, q * qd, k * kd  # (B, H, T, Dk)
    future = torch.ones(cs, cs, dtype=torch.bool, device=dev).triu(1)
    outs = []
    for st in range(0, T, cs):
        en = min(st + cs, T)
        n = en - st
        scores = torch.matmul(qa[:, :, st:en], kb[:, :, st:en].transpose(-1, -2))  # (B, H, n, n)
        scores = scores.masked_fill_(future[:n, :n], 0.0)
        outs.append(torch.matmul(scores, v[:, :, st:en]) + torch.matmul(qq[:, :, st:en], s))  # (B, H, n, Dv)
        if en < T or output_final_state:
            s = qd[:, :, en - 1 : en] * s + torch.matmul(kk[:, :, st:en].transpose(-1, -2), v[:, :, st:en])
    return torch.cat(outs, dim=2), (s if output_final_state else None)


def recurrent_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    mask: Tensor | None = None,
    keep: Tensor | None = None,
    scale: float | None = None,
    decay_steps: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Recurrent form, one step at a time (the decode path; T is usually 1): O(1) work per token."""
    in_dtype = q.dtype
    q, k, v, s, steps = _prepare(q, k, v, initial_state, mask, keep, scale, decay_steps)
    B, H, T, _ = q.shape
    gamma = _gamma(H, q.dtype, q.device)  # (1, H, 1, 1)
    if T == 1 and steps is None:  # the decode step
        s = torch.addcmul(gamma * s, k.transpose(-1, -2), v)  # (B, H, Dk, Dv)
        return torch.matmul(q, s).to(in_dtype), (s if output_final_state else None)
    outs = []
    for t in range(T):
        if steps is None:
            decay = gamma
        elif steps.dtype == torch.bool:
            decay = torch.where(steps[:, t, None, None, None], gamma, torch.ones_like(gamma))  # (B, H, 1, 1)
        else:
            decay = gamma ** steps[:, t, None, None, None].to(gamma.dtype)  # (B, H, 1, 1)
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, Dk, Dv)
        s = decay * s + kv
        outs.append(torch.matmul(q[:, :, t, None, :], s))  # (B, H, 1, Dv)
    o = torch.cat(outs, dim=2) if outs else q.new_zeros(B, H, 0, v.shape[-1])
    return o.to(in_dtype), (s if output_final_state else None)
