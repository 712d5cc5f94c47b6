"""The shipped default checkpoint loads through the model core's loader and models held-out text.

tests/data/heldout.jsonl holds the openings (first ~3,000 characters, cut at a line or sentence end)
of all ten validation documents of the builtin corpus, which training never saw: seven State of the
Union addresses, Henry IV part 2, Lamentations (KJV) and Moby-Dick chapter 74. Each is scored as a
document is seen in training: after the `<|endoftext|>` separator.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from model.checkpoint import from_pretrained, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "checkpoints" / "retserve-small"
HELDOUT = Path(__file__).resolve().parents[1] / "data" / "heldout.jsonl"
# Stated threshold (issue: at most 4.5 nats, goal 4.0); the model card records the measured value.
MAX_HELDOUT_LOSS = 4.5  # measured at export: 4.33 nats over 6,647 tokens
MAX_WEIGHTS_BYTES = 25 * 1024 * 1024


def test_shipped_checkpoint_is_small_and_complete():
    names = ("config.json", "model.safetensors", "tokenizer.tiktoken", "tokenizer_meta.json", "README.md")
    for name in names:
        assert (SHIPPED / name).is_file(), name
    assert (SHIPPED / "model.safetensors").stat().st_size <= MAX_WEIGHTS_BYTES


@torch.inference_mode()
def test_shipped_checkpoint_loss_on_heldout_text():
    model = from_pretrained(SHIPPED)
    tok = load_tokenizer(SHIPPED)
    assert model.config.vocab_size == tok.vocab_size
    assert model.config.eos_token_id == tok.eos_id
    losses = []
    docs = [json.loads(line)["text"] for line in HELDOUT.read_text().splitlines()]
    assert len(docs) == 10
    for text in docs:
        ids = torch.tensor([[tok.eos_id, *tok.encode(text)]])  # documents start after a separator
        logits, _ = model(ids[:, :-1])
        losses.append(F.cross_entropy(logits[0], ids[0, 1:], reduction="none"))
    loss = torch.cat(losses).mean().item()
    assert loss < MAX_HELDOUT_LOSS, f"held-out loss {loss:.3f} nats"
    # and much better than chance over the vocabulary
    assert loss < 0.6 * torch.log(torch.tensor(float(tok.vocab_size))).item()


@torch.inference_mode()
def test_shipped_checkpoint_generates_text():
    from model.sampling import SamplingParams, generate

    model = from_pretrained(SHIPPED)
    tok = load_tokenizer(SHIPPED)
    out, state = generate(model, tok.encode("The "), 20, params=SamplingParams(temperature=0.0))
    text = tok.decode(out)
    assert len(out) >= 1 and text.strip()
    assert int(state.position[0]) == len(tok.encode("The ")) + len(out)
