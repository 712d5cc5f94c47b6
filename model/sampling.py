"""Batched next-token sampling: penalties, logit bias, temperature, top-k / top-p / min-p, seeds.

Every function works on a batch of rows `(B, V)` with per-row parameter tensors `(B,)`, so an
engine can batch requests whose sampling settings differ. A per-row parameter given as `None`
means "off for every row" and lets the function skip that work.

Processing order (the one `SamplingTensors.process` / `.sample` and `generate` use):

1. penalties on the model's logits (`apply_penalties`): repetition (HF/CTRL), then presence and
   frequency (OpenAI);
2. logit bias (`apply_logit_bias`), added after the penalties so a bias is an exact additive offset
   (a bias of -100 reliably bans a token whatever the penalties do);
3. temperature, then top-k, then top-p over the top-k-renormalised distribution, then min-p
   (`apply_temperature_topk_topp_minp`);
4. greedy argmax for rows with temperature 0 (of the logits after steps 1-2), otherwise
   inverse-CDF sampling of the softmax with one uniform drawn from the row's own generator.

Reproducibility: a row's token depends only on its own logits, its own parameters and its own
`torch.Generator`; never on which other rows share the batch or where the row sits in it. Each
`sample` call draws exactly one float64 uniform from every row's generator (greedy rows included,
unless the whole batch is greedy and `SamplingTensors.sample` skips drawing), so a seeded request
gives the same tokens alone or batched. Rows without a generator (seed None) draw from torch's
global default CPU generator. Generators are CPU generators by default; the uniforms are moved to
the logits' device, which also makes a seed give the same uniforms on CPU and GPU.

Log-probabilities (`logprobs`) are computed from whatever logits they are given; the convention
here (and in `generate`'s callers) is the *raw model logits*, before penalties, bias, temperature
and filtering: the model's own distribution, finite for every token and independent of the
request's sampling settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from model.retnet import RetNet
    from model.state import RetentionState

__all__ = [
    "LogitBias",
    "SamplingParams",
    "SamplingTensors",
    "add_tokens",
    "apply_logit_bias",
    "apply_penalties",
    "apply_temperature_topk_topp_minp",
    "count_tokens",
    "draw_uniforms",
    "generate",
    "logprobs",
    "sample",
]

_MAX_PENALTY = 2.0
_MAX_BIAS = 100.0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


# ---- per-request parameters --------------------------------------------------------------------
@dataclass
class SamplingParams:
    """One request's sampling settings (engine-independent math parameters).

    - `temperature`: 0 = greedy (argmax), otherwise logits are divided by it.
    - `top_k`: keep the k most likely tokens (0 = off).
    - `top_p`: keep the smallest set of most likely tokens whose probability reaches top_p (1 = off).
    - `min_p`: drop tokens whose probability is below min_p * (probability of the top token) (0 = off).
    - `repetition_penalty`: HF/CTRL style; the logit of every already-seen token is divided by it if
      positive and multiplied by it if negative (1 = off).
    - `presence_penalty`, `frequency_penalty`: OpenAI style; subtract
      presence * 1[count > 0] + frequency * count from each token's logit (0 = off).
    - `seed`: seeds the request's own generator (None = torch's global default generator).
    - `logit_bias`: {token id: bias in [-100, 100]} added to the logits.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the first out-of-range field."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        t = self.temperature
        need(
            _is_real(t) and math.isfinite(t) and t >= 0,
            f"temperature must be a finite number >= 0, got {t!r}",
        )
        k = self.top_k
        need(_is_int(k) and 0 <= k < 2**31, f"top_k must be an integer in [0, 2**31) (0 = off), got {k!r}")
        p = self.top_p
        need(_is_real(p) and 0 < p <= 1, f"top_p must be in (0, 1], got {p!r}")
        m = self.min_p
        need(_is_real(m) and 0 <= m <= 1, f"min_p must be in [0, 1], got {m!r}")
        r = self.repetition_penalty
        need(
            _is_real(r) and math.isfinite(r) and r > 0,
            f"repetition_penalty must be a finite number > 0, got {r!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            need(
                _is_real(v) and -_MAX_PENALTY <= v <= _MAX_PENALTY,
                f"{name} must be in [{-_MAX_PENALTY}, {_MAX_PENALTY}], got {v!r}",
            )
        s = self.seed
        need(
            s is None or (_is_int(s) and 0 <= s < 2**64),
            f"seed must be null or an integer in [0, 2**64), got {s!r}",
        )
        if self.logit_bias is not None:
            need(
                isinstance(self.logit_bias, dict),
                f"logit_bias must be a dict, got {type(self.logit_bias).__name__}",
            )
            for tok, bias in self.logit_bias.items():
                need(
                    _is_int(tok) and 0 <= tok < vocab_size,
                    f"logit_bias token id {tok!r} is out of range [0, vocab_size={vocab_size})",
                )
                need(
                    _is_real(bias) and -_MAX_BIAS <= bias <= _MAX_BIAS,
                    f"logit_bias for token {tok} must be in [{-_MAX_BIAS}, {_MAX_BIAS}], got {bias!r}",
                )

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A fresh generator seeded with `seed`, or None when there is no seed."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


# ---- token counts ------------------------------------------------------------------------------
def count_tokens(
    sequences: Sequence[Sequence[int] | Tensor], vocab_size: int, device: torch.device | str | None = None
) -> Tensor:
    """(B, V) int64 occurrence counts of each row's tokens (the input of `apply_penalties`)."""
    counts = torch.zeros(len(sequences), vocab_size, dtype=torch.long, device=device)  # (B, V)
    for i, seq in enumerate(sequences):
        ids = torch.as_tensor(seq, dtype=torch.long, device=device).reshape(-1)  # (T_i,)
        if ids.numel():
            counts[i].scatter_add_(0, ids, torch.ones_like(ids))
    return counts


def add_tokens(counts: Tensor, tokens: Tensor) -> Tensor:
    """Add one occurrence of tokens[b] to counts[b] for every row, in place; returns counts."""
    idx = tokens.to(device=counts.device, dtype=torch.long).reshape(-1, 1)  # (B, 1)
    return counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=counts.dtype))


# ---- logits processing -------------------------------------------------------------------------
def apply_penalties(
    logits: Tensor,  # (B, V) float
    token_counts: Tensor,  # (B, V) int: occurrences of each token so far
    repetition: Tensor | None = None,  # (B,) float, 1 = off
    presence: Tensor | None = None,  # (B,) float, 0 = off
    frequency: Tensor | None = None,  # (B,) float, 0 = off
) -> Tensor:
    """Penalised logits (a new tensor): repetition (HF/CTRL) first, then presence and frequency (OpenAI).

    Which tokens `token_counts` counts is the caller's choice: the prompt and the generated tokens
    (what HF's repetition penalty does, and what `generate` uses) or the generated tokens only
    (what OpenAI describes for presence/frequency). A token counts as "seen" when its count is > 0.
    """
    out = logits
    seen = token_counts > 0  # (B, V)
    if repetition is not None:
        p = repetition.to(device=logits.device, dtype=logits.dtype)[:, None]  # (B, 1)
        penalised = torch.where(out > 0, out / p, out * p)  # (B, V)
        out = torch.where(seen, penalised, out)
    if presence is not None:
        pres = presence.to(device=logits.device, dtype=logits.dtype)[:, None]  # (B, 1)
        out = out - pres * seen.to(logits.dtype)
    if frequency is not None:
        freq = frequency.to(device=logits.device, dtype=logits.dtype)[:, None]  # (B, 1)
        out = out - freq * token_counts.to(logits.dtype)
    return out


class LogitBias(NamedTuple):
    """Sparse per-row logit bias: logits[rows[i], token_ids[i]] += values[i] (duplicates add up)."""

    rows: Tensor  # (N,) int64
    token_ids: Tensor  # (N,) int64
    values: Tensor  # (N,) float32

    @classmethod
    def from_dicts(
        cls, biases: Sequence[dict[int, float] | None], device: torch.device | str | None = None
    ) -> LogitBias | None:
        """From one {token id: bias} dict (or None) per row; None if no row has a bias."""
        rows: list[int] = []
        toks: list[int] = []
        vals: list[float] = []
        for r, d in enumerate(biases):
            for t, v in (d or {}).items():
                rows.append(r)
                toks.append(int(t))
                vals.append(float(v))
        if not rows:
            return None
        return cls(
            torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(toks, dtype=torch.long, device=device),
            torch.tensor(vals, dtype=torch.float32, device=device),
        )


def apply_logit_bias(logits: Tensor, bias: Tensor | LogitBias | None) -> Tensor:
    """logits + bias (a new tensor); `bias` is dense (B, V) or a sparse `LogitBias`."""
    if bias is None:
        return logits
    if isinstance(bias, LogitBias):
        dev = logits.device
        return logits.index_put(
            (bias.rows.to(dev), bias.token_ids.to(dev)), bias.values.to(dev, logits.dtype), accumulate=True
        )
    return logits + bias.to(device=logits.device, dtype=logits.dtype)  # (B, V)


def apply_temperature_topk_topp_minp(
    logits: Tensor,  # (B, V) float
    temperature: Tensor | None,  # (B,) float; rows with 0 are left unscaled (greedy is done by `sample`)
    top_k: Tensor | None = None,  # (B,) int64, 0 = off
    top_p: Tensor | None = None,  # (B,) float, 1 = off
    min_p: Tensor | None = None,  # (B,) float, 0 = off
) -> Tensor:
    """Temperature-scaled logits with -inf for every token removed by top-k, top-p or min-p.

    In order: divide by temperature; keep the top_k highest; of the top-k distribution
    (renormalised) keep the smallest prefix whose probability reaches top_p; drop tokens with
    probability < min_p * max probability. The most likely token is never removed. Ties in the
    ranking are broken by token id (stable sort).
    """
    out = logits
    if temperature is not None:
        t = temperature.to(device=logits.device, dtype=logits.dtype)  # (B,)
        t = torch.where(t > 0, t, torch.ones_like(t))
        out = out / t[:, None]  # (B, V)
    if top_k is None and top_p is None and min_p is None:
        return out
    V = out.shape[-1]
    sorted_logits, order = out.sort(dim=-1, descending=True, stable=True)  # (B, V) each
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)  # (B, V), in sorted order
    if top_k is not None:
        k = top_k.to(device=out.device, dtype=torch.long)  # (B,)
        k = torch.where(k > 0, k.clamp(max=V), torch.full_like(k, V))
        ranks = torch.arange(V, device=out.device)  # (V,)
        remove |= ranks[None, :] >= k[:, None]
    if top_p is not None or min_p is not None:
        probs = torch.softmax(sorted_logits.masked_fill(remove, -math.inf), dim=-1)  # (B, V)
        if top_p is not None:
            p = top_p.to(device=out.device, dtype=probs.dtype)[:, None]  # (B, 1)
            mass_before = probs.cumsum(dim=-1) - probs  # (B, V): probability of the better-ranked tokens
            remove |= (mass_before >= p) & (p < 1)
        if min_p is not None:
            m = min_p.to(device=out.device, dtype=probs.dtype)[:, None]  # (B, 1)
            remove |= probs < m * probs[:, :1]
    removed = torch.empty_like(remove).scatter_(1, order, remove)  # (B, V), back in vocab order
    return out.masked_fill(removed, -math.inf)


# ---- sampling ----------------------------------------------------------------------------------
def draw_uniforms(generators: Sequence[torch.Generator | None], device: torch.device | str) -> Tensor:
    """(B,) float64 uniforms in [0, 1): one draw from each row's own generator.

    Rows whose generator is None share one draw from torch's global default CPU generator.
    """
    B = len(generators)
    u = torch.empty(B, dtype=torch.float64)  # (B,) on CPU
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), dtype=torch.float64)
    for i, g in enumerate(generators):  # one draw per seeded row: unavoidable with per-row generators
        if g is not None:
            u[i : i + 1] = torch.rand(1, generator=g, dtype=torch.float64, device=g.device)
    return u.to(device)


def _inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Token ids (B,): for each row the first token whose cumulative probability exceeds u * total."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # (B, V)
    target = u.to(device=cdf.device, dtype=torch.float64)[:, None] * cdf[:, -1:]  # (B, 1)
    # right=True: the first index with cdf > target, which always has probability > 0.
    idx = torch.searchsorted(cdf, target, right=True)  # (B, 1)
    return idx.squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def sample(
    logits: Tensor,  # (B, V) penalties and bias already applied
    temperature: Tensor,  # (B,) float, 0 = greedy
    top_k: Tensor | None = None,  # (B,) int64
    top_p: Tensor | None = None,  # (B,) float
    min_p: Tensor | None = None,  # (B,) float
    generators: Sequence[torch.Generator | None] | None = None,  # B entries; None = all default
) -> Tensor:
    """Token ids (B,) int64: argmax for temperature-0 rows, otherwise a draw from the filtered softmax.

    Each row's draw uses one uniform from its own generator (inverse-CDF sampling), so its token
    depends only on its own logits, parameters and generator, never on the rest of the batch.
    """
    B, _ = logits.shape
    if generators is None:
        generators = [None] * B
    if len(generators) != B:
        raise ValueError(f"got {len(generators)} generators for {B} rows")
    x = logits.float()  # (B, V)
    temperature = temperature.to(device=x.device, dtype=x.dtype)  # (B,)
    greedy_ids = x.argmax(dim=-1)  # (B,)
    processed = apply_temperature_topk_topp_minp(x, temperature, top_k, top_p, min_p)  # (B, V)
    probs = torch.softmax(processed, dim=-1)  # (B, V)
    sampled_ids = _inverse_cdf(probs, draw_uniforms(generators, x.device))  # (B,)
    return torch.where(temperature > 0, sampled_ids, greedy_ids)


@dataclass
class SamplingTensors:
    """The per-row tensors of one batch composition, built once by `from_params`.

    Optional fields are None when no row of the batch uses the feature (the work is skipped).
    """

    temperature: Tensor  # (B,) float32
    top_k: Tensor | None  # (B,) int64
    top_p: Tensor | None  # (B,) float32
    min_p: Tensor | None  # (B,) float32
    repetition: Tensor | None  # (B,) float32
    presence: Tensor | None  # (B,) float32
    frequency: Tensor | None  # (B,) float32
    logit_bias: LogitBias | None
    generators: list[torch.Generator | None]
    all_greedy: bool

    @property
    def batch_size(self) -> int:
        return int(self.temperature.shape[0])

    @property
    def needs_counts(self) -> bool:
        """Whether `process` / `sample` need token counts (some row uses a penalty)."""
        return self.repetition is not None or self.presence is not None or self.frequency is not None

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        vocab_size: int,
        device: torch.device | str | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> SamplingTensors:
        """Validate every row's params and stack them into tensors on `device`.

        `generators`: one per row. An engine passes the generators it keeps per request (a
        request's generator must live as long as the request, across batch compositions); when
        omitted, fresh ones are made from the seeds (`SamplingParams.make_generator`).
        """
        if not params:
            raise ValueError("from_params needs at least one SamplingParams")
        for p in params:
            p.validate(vocab_size)
        if generators is None:
            generators = [p.make_generator() for p in params]
        elif len(generators) != len(params):
            raise ValueError(f"got {len(generators)} generators for {len(params)} rows")

        def f32(values: list[float], off: float) -> Tensor | None:
            if all(v == off for v in values):
                return None
            return torch.tensor(values, dtype=torch.float32, device=device)

        top_k = [p.top_k for p in params]
        temperature = [float(p.temperature) for p in params]
        return cls(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_k=None if not any(top_k) else torch.tensor(top_k, dtype=torch.long, device=device),
            top_p=f32([float(p.top_p) for p in params], 1.0),
            min_p=f32([float(p.min_p) for p in params], 0.0),
            repetition=f32([float(p.repetition_penalty) for p in params], 1.0),
            presence=f32([float(p.presence_penalty) for p in params], 0.0),
            frequency=f32([float(p.frequency_penalty) for p in params], 0.0),
            logit_bias=LogitBias.from_dicts([p.logit_bias for p in params], device=device),
            generators=list(generators),
            all_greedy=all(p.temperature == 0 for p in params),
        )

    def _penalise(self, logits: Tensor, token_counts: Tensor | None) -> Tensor:
        x = logits.float()  # (B, V)
        if self.needs_counts:
            if token_counts is None:
                raise ValueError("this batch uses penalties: token_counts (B, V) is required")
            x = apply_penalties(x, token_counts, self.repetition, self.presence, self.frequency)
        return apply_logit_bias(x, self.logit_bias)

    def process(self, logits: Tensor, token_counts: Tensor | None = None) -> Tensor:
        """(B, V) float32: the logits after penalties, bias, temperature and filters (-inf = removed)."""
        x = self._penalise(logits, token_counts)
        return apply_temperature_topk_topp_minp(x, self.temperature, self.top_k, self.top_p, self.min_p)

    def sample(self, logits: Tensor, token_counts: Tensor | None = None) -> Tensor:
        """Token ids (B,) int64 for raw model logits (B, V): the whole pipeline of this module."""
        x = self._penalise(logits, token_counts)  # (B, V)
        if self.all_greedy:
            return x.argmax(dim=-1)
        return sample(x, self.temperature, self.top_k, self.top_p, self.min_p, self.generators)


# ---- log-probabilities -------------------------------------------------------------------------
def logprobs(logits: Tensor, chosen: Tensor, top_n: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(chosen_logprob (B,), top_ids (B, n), top_logprobs (B, n)) from log_softmax(logits) in float32.

    Pass the raw model logits to report the model's own distribution (this module's convention:
    before penalties, bias, temperature and filtering), or `SamplingTensors.process(...)` output to
    report the distribution actually sampled from (removed tokens then have -inf).
    `n = min(top_n, V)`; top entries are sorted by decreasing log-probability.
    """
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    lp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen_lp = lp.gather(1, chosen.to(device=lp.device, dtype=torch.long).reshape(-1, 1)).squeeze(1)  # (B,)
    top_lp, top_ids = lp.topk(min(top_n, lp.shape[-1]), dim=-1)  # (B, n) each
    return chosen_lp, top_ids, top_lp


# ---- a simple generation loop ------------------------------------------------------------------
@torch.inference_mode()
def generate(
    model: RetNet,
    input_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_token_ids: set[int] | None = None,
    state: RetentionState | None = None,
) -> tuple[list[int], RetentionState]:
    """Generate up to `max_new_tokens` tokens for one prompt; returns (generated ids, final state).

    - The prompt (a non-empty list of ids, or a (T,) / (1, T) tensor) is read with one model call
      (mode "auto", logits_to_keep=1) on top of `state` (a batch-1 state, or None for a fresh
      sequence); then one recurrent step per token.
    - `params` None means `SamplingParams()` (temperature 1, no seed).
    - Penalties count the prompt tokens given here plus the generated ones (not the tokens that
      an incoming `state` has already absorbed: the helper does not know them).
    - Stops after `max_new_tokens`, or after sampling `model.config.eos_token_id` or any of
      `stop_token_ids`; that stop token is included as the last returned id.
    - The final state has absorbed exactly the prompt plus every returned token: each sampled
      token is fed to the model once, the last one included (one step whose logits go unused).
      With max_new_tokens == 0 it is the state after the prompt.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    params = SamplingParams() if params is None else params
    V = model.config.vocab_size
    params.validate(V)
    device = model.device
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).to(device)  # (1, T)
    if ids.shape[1] == 0:
        raise ValueError("generate needs at least one prompt token")
    if int(ids.min()) < 0 or int(ids.max()) >= V:
        raise ValueError(f"prompt token ids must be in [0, vocab_size={V})")
    stops = set(stop_token_ids or ())
    if model.config.eos_token_id is not None:
        stops.add(model.config.eos_token_id)

    st = SamplingTensors.from_params([params], V, device=device)
    counts = count_tokens([ids[0]], V, device=device) if st.needs_counts else None  # (1, V)
    logits, state = model(ids, state, mode="auto", logits_to_keep=1)  # (1, 1, V)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        tok = st.sample(logits[:, -1], counts)  # (1,)
        generated.append(int(tok.item()))
        if counts is not None:
            add_tokens(counts, tok)
        logits, state = model(tok.view(1, 1), state, mode="auto")  # absorb the token just returned
        if generated[-1] in stops:
            break
    return generated, state
