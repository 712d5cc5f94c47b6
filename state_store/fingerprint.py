"""Model fingerprints: a stable hash of the shape config and of the weights, computed once at load.

A saved state is only meaningful to the exact model that made it; the codec records the fingerprint
and refuses a state whose fingerprint differs from the loaded model's.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from model.config import RetNetConfig

FINGERPRINT_PREFIX = "rn1-"
_DIGEST_SIZE = 20  # bytes (160 bits): collisions are not a concern at any realistic number of models


def _hasher() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=_DIGEST_SIZE, person=b"retserve-model")


def _config_bytes(config: RetNetConfig) -> bytes:
    return json.dumps(config.fingerprint_dict(), sort_keys=True, separators=(",", ":")).encode()


def config_fingerprint(config: RetNetConfig) -> str:
    """A fingerprint of the shapes alone (for tests and tools that have no weights)."""
    h = _hasher()
    h.update(b"config-only\0")
    h.update(_config_bytes(config))
    return FINGERPRINT_PREFIX + h.hexdigest()


def model_fingerprint(model: nn.Module, config: RetNetConfig | None = None) -> str:
    """Hash of `config.fingerprint_dict()` and of every tensor of `model.state_dict()`.

    Names, dtypes, shapes and raw bytes are hashed in sorted name order, so the result does not depend
    on the device or on the order parameters were created in. Reads every weight once: call it when the
    model is loaded and keep the string.
    """
    cfg = config if config is not None else getattr(model, "config", None)
    if not isinstance(cfg, RetNetConfig):
        raise TypeError("model_fingerprint needs a RetNet (with .config) or an explicit RetNetConfig")
    h = _hasher()
    h.update(b"model\0")
    h.update(_config_bytes(cfg))
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return FINGERPRINT_PREFIX + h.hexdigest()


def check_fingerprint(value: str) -> str:
    """Validate the form of a fingerprint string (used on untrusted headers)."""
    digits = value[len(FINGERPRINT_PREFIX) :]
    if (
        not value.startswith(FINGERPRINT_PREFIX)
        or len(digits) != 2 * _DIGEST_SIZE
        or any(c not in "0123456789abcdef" for c in digits)
    ):
        raise ValueError(f"a fingerprint is {FINGERPRINT_PREFIX!r} + {2 * _DIGEST_SIZE} hex digits")
    return value
