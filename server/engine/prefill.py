"""Reading prompt pieces: one padded chunkwise pass for ordinary pieces, or a whole prompt through a
token-dropping policy (B=1). Pure model calls: no request bookkeeping here."""

from __future__ import annotations

import torch
from torch import Tensor

from model.dropping import prefill_dropping
from model.retnet import RetNet
from model.state import RetentionState
from server.engine.live import LiveRequest

Piece = tuple[LiveRequest, int, int]  # (request, start, end) of its prompt


def read_pieces(model: RetNet, pieces: list[Piece], chunk_size: int) -> tuple[Tensor, RetentionState]:
    """Read every piece on top of its request's own state in one batched chunkwise pass.

    Returns the logits after each piece's last token (n, V) and the n new states (row i = piece i).
    Rows are left-padded, so every row's last column is a real token; pads touch no state.
    """
    n, T = len(pieces), max(e - s for _, s, e in pieces)
    ids = torch.zeros(n, T, dtype=torch.long)  # (n, T)
    mask = torch.zeros(n, T, dtype=torch.long)  # (n, T) 1 = token, 0 = pad
    keep = torch.ones(n, T, dtype=torch.bool)  # (n, T)
    any_keep = False
    for i, (live, s, e) in enumerate(pieces):
        ids[i, T - (e - s) :] = torch.tensor(live.request.prompt_ids[s:e], dtype=torch.long)
        mask[i, T - (e - s) :] = 1
        if live.keep is not None:
            keep[i, T - (e - s) :] = live.keep[s:e]
            any_keep = True
    states = [live.state if live.state is not None else model.empty_state(1) for live, _, _ in pieces]
    dev = model.device
    logits, new = model(
        ids.to(dev),
        RetentionState.stack(states),
        attention_mask=None if bool(mask.all()) else mask.to(dev),
        keep=keep.to(dev) if any_keep else None,
        mode="chunk",
        chunk_size=chunk_size,
        logits_to_keep=1,
    )
    return logits[:, -1], new  # (n, V), n rows


def read_with_dropping(
    model: RetNet, live: LiveRequest, chunk_size: int
) -> tuple[Tensor, RetentionState, int]:
    """Read a whole prompt through its request's dropping policy: (logits (1, V), state, dropped count)."""
    spec = live.dropping
    assert spec is not None and live.prefilled == 0
    ids = torch.tensor([live.request.prompt_ids], dtype=torch.long, device=model.device)  # (1, T)
    res = prefill_dropping(model, ids, spec, state=live.state, chunk_size=chunk_size)
    return res.logits, res.state, int(res.dropped[0])  # (1, V)
