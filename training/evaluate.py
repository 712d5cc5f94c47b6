"""Validation loss and text samples for RetNet and the Transformer baseline."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.retnet import RetNet
from model.sampling import SamplingParams, generate
from model.transformer import GPTBaseline, KVCache


def lm_logits(model: nn.Module, x: Tensor, retention_mode: str = "chunk", chunk_size: int = 64) -> Tensor:
    """Logits (B, T, V) of either architecture for a batch of token windows."""
    if isinstance(model, RetNet):
        return model(x, mode=retention_mode, chunk_size=chunk_size)[0]
    return model(x)[0]


class LossModule(nn.Module):
    """Wraps a language model so that forward returns the mean next-token loss (what DDP wraps)."""

    def __init__(self, model: nn.Module, retention_mode: str = "chunk", chunk_size: int = 64) -> None:
        super().__init__()
        self.model = model
        self.retention_mode, self.chunk_size = retention_mode, chunk_size

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        logits = lm_logits(self.model, x, self.retention_mode, self.chunk_size)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> list[tuple[int, int]]:
    """Contiguous non-overlapping (start, end) windows over `tokens`, each of seq_len + 1 tokens."""
    n = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return [(i * seq_len, i * seq_len + seq_len + 1) for i in range(n)]


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    retention_mode: str = "chunk",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean next-token loss (nats) over the first windows of `tokens`; deterministic."""
    was_training = model.training
    model.eval()
    wins = windows(tokens, seq_len, None if max_batches is None else max_batches * batch_size)
    if not wins:
        raise ValueError(f"need at least {seq_len + 1} tokens to evaluate, got {len(tokens)}")
    total, count = 0.0, 0
    for b in range(0, len(wins), batch_size):
        batch = np.stack([tokens[s:e].astype(np.int64) for s, e in wins[b : b + batch_size]])
        xy = torch.from_numpy(batch).to(device)
        with torch.autocast(
            device_type=torch.device(device).type,
            dtype=autocast_dtype or torch.bfloat16,
            enabled=autocast_dtype is not None,
        ):
            logits = lm_logits(model, xy[:, :-1], retention_mode)
        loss = F.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += xy[:, 1:].numel()
    model.train(was_training)
    mean = total / count
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}


@torch.no_grad()
def sample_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    """A seeded sample (temperature 0.8, top-k 40) from either architecture."""
    was_training = model.training
    model.eval()
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    params = SamplingParams(temperature=0.8, top_k=40, seed=seed)
    if isinstance(model, RetNet):
        out, _ = generate(model, ids, max_new_tokens, params=params)
    else:
        out = _generate_baseline(model, ids, max_new_tokens, params)
    model.train(was_training)
    return prompt + tokenizer.decode(out)


def _generate_baseline(
    model: GPTBaseline, ids: list[int], max_new_tokens: int, params: SamplingParams
) -> list[int]:
    from model.sampling import SamplingTensors

    device = model.lm_head.weight.device
    cache = KVCache.empty(
        model.config, 1, len(ids) + max_new_tokens, device=device, dtype=model.lm_head.weight.dtype
    )
    gen = params.make_generator()
    st = SamplingTensors.from_params([params], model.config.vocab_size, device, generators=[gen])
    logits, _ = model(torch.tensor([ids], device=device), cache, logits_to_keep=1)
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(st.sample(logits[:, -1].float(), None)[0])
        out.append(tok)
        if tok == model.config.eos_token_id:
            break
        logits, _ = model(torch.tensor([[tok]], device=device), cache)
    return out
