"""The engine's boundary: a submitted request is checked once here and becomes a `LiveRequest`.

Every problem is a ValueError saying what to fix (the HTTP layer maps it to 400); past this point
the engine only asserts its own invariants.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from model.retnet import RetNet
from model.sampling import SamplingTensors, count_tokens
from model.tokenizer import Tokenizer
from server.engine.detokenizer import Detokenizer
from server.engine.live import LiveRequest
from server.engine.types import EngineRequest, RequestOutput, RequestTimings


def _sampling_row(request: EngineRequest, vocab: int) -> SamplingTensors:
    """Validate the parameters and build this request's sampling row (with its own generator)."""
    params = request.params
    params.validate_stopping(vocab)
    try:  # validates the sampling parameters; a failure is the caller's 400, not the engine's
        return SamplingTensors.from_params([params], vocab, generators=[params.make_generator()])
    except ValueError:
        raise
    except (RuntimeError, OverflowError, TypeError) as e:
        raise ValueError(f"these sampling parameters cannot be used: {e}") from None


def _check_prompt(request: EngineRequest, vocab: int) -> None:
    ids = request.prompt_ids
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise ValueError("prompt_ids must be a list of token ids (integers)")
    if ids and (min(ids) < 0 or max(ids) >= vocab):
        raise ValueError(f"prompt token ids out of range: every id must be in [0, {vocab})")
    if not ids and request.logits is None:
        raise ValueError(
            "a request needs at least one prompt token, or the `logits` saved with its `state` to "
            "continue from there without new input"
        )


def _check_logits(request: EngineRequest, model: RetNet) -> None:
    """`logits` (continuing without input): a finite (V,) tensor, with a state and an empty prompt."""
    logits, vocab = request.logits, model.config.vocab_size
    if logits is None:
        return
    if request.prompt_ids:
        raise ValueError("logits are only used with an empty prompt (they belong to the state as it is)")
    if request.state is None:
        raise ValueError("logits need the state they belong to (request.state)")
    if request.dropping is not None:
        raise ValueError("token dropping needs a prompt to read; this request has none")
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (vocab,):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a ({vocab},) tensor (the vocabulary size), got {shape}")
    if not logits.is_floating_point() or not bool(torch.isfinite(logits).all()):
        raise ValueError("logits must be finite floating-point values")
    request.logits = logits.to(model.device, torch.float32)  # (V,) beside the prefill logits it joins


def _check_state(request: EngineRequest, model: RetNet) -> None:
    if request.state is None:
        return
    request.state.check(model.config)  # StateMismatchError is a ValueError
    if request.state.batch_size != 1:
        raise ValueError("a request's state must have exactly one row")
    want = model.empty_state(1)
    if request.state.device != want.device or request.state.dtype != want.dtype:
        request.state = request.state.to(want.device, want.dtype)


def accept_request(
    request: EngineRequest, model: RetNet, tokenizer: Tokenizer, emit: Callable[[RequestOutput], None]
) -> LiveRequest:
    """Check `request` (ValueError saying what to fix) and build its runtime record."""
    vocab = model.config.vocab_size
    sampling = _sampling_row(request, vocab)
    _check_prompt(request, vocab)
    _check_logits(request, model)
    _check_state(request, model)
    spec = request.dropping
    if spec is not None:
        spec.check(model.config)
    params = request.params
    live = LiveRequest(
        request=request,
        detok=Detokenizer(tokenizer, params.stop, params.min_tokens),
        sampling=sampling,
        timings=RequestTimings(arrival=time.perf_counter()),
        emit=emit,
        state=request.state,
        next_logits=request.logits,
        # keep == 1 drops nothing: such a prompt is read like any other (in pieces, under the budget)
        dropping=spec if spec is not None and spec.keep < 1 else None,
    )
    if params.uses_penalties:
        live.counts = count_tokens([request.prompt_ids], vocab)[0]  # (V,)
    return live
