"""RetNet configuration: a dataclass whose JSON is the `config.json` of fla's RetNet (HF field names)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "retnet"


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or inconsistent with the others."""


@dataclass
class RetNetConfig:
    vocab_size: int = 8192
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None = num_heads (no GQA)
    expand_k: float = 1.0
    expand_v: float = 2.0
    hidden_ratio: int | None = 2
    intermediate_size: int | None = None  # None = 256 * ceil(int(D * hidden_ratio * 2 / 3) / 256)
    hidden_act: str = "swish"
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    max_position_embeddings: int = 2048  # informational: retention has no position limit
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    rope_theta: float = 10000.0
    model_type: str = MODEL_TYPE
    # Keys of a loaded config.json that this implementation does not use (kept for round trips).
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def key_dim(self) -> int:
        return round(self.hidden_size * self.expand_k)

    @property
    def value_dim(self) -> int:
        return round(self.hidden_size * self.expand_v)

    @property
    def head_k_dim(self) -> int:
        return self.key_dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        ratio = 4 if self.hidden_ratio is None else self.hidden_ratio
        return 256 * math.ceil(int(self.hidden_size * ratio * 2 / 3) / 256)

    def state_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        """Shape of one layer's retention state: (B, H, head_k_dim, head_v_dim)."""
        return (batch_size, self.num_heads, self.head_k_dim, self.head_v_dim)

    def state_nbytes(self, element_size: int = 4) -> int:
        """Bytes of one session's retention state (all layers) at `element_size` bytes per number (4:
        float32, as the engine keeps states; 2: a bf16/fp16 store)."""
        return self.num_hidden_layers * self.num_heads * self.head_k_dim * self.head_v_dim * element_size

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads"):
            v = getattr(self, name)
            need(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                f"{name} must be a positive integer, got {v!r}",
            )
        need(self.model_type == MODEL_TYPE, f"model_type must be {MODEL_TYPE!r}, got {self.model_type!r}")
        need(self.hidden_act in ("swish", "silu"), f"hidden_act must be 'swish', got {self.hidden_act!r}")
        need(self.expand_k > 0 and self.expand_v > 0, "expand_k and expand_v must be positive")
        need(
            math.isclose(self.hidden_size * self.expand_k, self.key_dim),
            f"hidden_size * expand_k must be an integer, got {self.hidden_size * self.expand_k}",
        )
        need(
            math.isclose(self.hidden_size * self.expand_v, self.value_dim),
            f"hidden_size * expand_v must be an integer, got {self.hidden_size * self.expand_v}",
        )
        need(
            self.key_dim % self.num_heads == 0,
            f"key dim {self.key_dim} must be divisible by num_heads {self.num_heads}",
        )
        need(
            self.value_dim % self.num_heads == 0,
            f"value dim {self.value_dim} must be divisible by num_heads {self.num_heads}",
        )
        need(self.head_k_dim % 2 == 0, f"head_k_dim {self.head_k_dim} must be even for rotary embeddings")
        kv = self.kv_heads
        need(isinstance(kv, int) and kv > 0, f"num_kv_heads must be a positive integer or null, got {kv!r}")
        need(self.num_heads % kv == 0, f"num_heads {self.num_heads} must be divisible by num_kv_heads {kv}")
        need(self.ffn_size > 0, f"intermediate_size must be positive, got {self.ffn_size}")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            need(
                v is None or (isinstance(v, int) and 0 <= v < self.vocab_size),
                f"{name} must be null or in [0, vocab_size={self.vocab_size}), got {v!r}",
            )

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {**self.extra, **d}
        # Fields fla/transformers expect to find in a RetNet config.json.
        out.setdefault("architectures", ["RetNetForCausalLM"])
        out.setdefault("attn_mode", "chunk")
        out.setdefault("use_output_gate", True)
        out.setdefault("use_short_conv", False)
        out.setdefault("feature_map", None)
        out.setdefault("elementwise_affine", True)
        out.setdefault("fuse_norm", True)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetNetConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ConfigError(f"model_type must be {MODEL_TYPE!r}, got {data.get('model_type')!r}")
        unsupported = {
            "use_short_conv": False,
            "feature_map": None,
            "use_output_gate": True,
            "elementwise_affine": True,
            "attnres_block_size": None,
        }
        for key, ok in unsupported.items():
            if data.get(key, ok) != ok:
                raise ConfigError(f"{key}={data[key]!r} is not supported by this RetNet (only {ok!r})")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if "rms_norm_eps" in extra and "norm_eps" not in kwargs:
            kwargs["norm_eps"] = extra["rms_norm_eps"]
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:  # pragma: no cover - defensive
            raise ConfigError(str(e)) from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> RetNetConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def fingerprint_dict(self) -> dict[str, Any]:
        """The fields that determine tensor shapes and numerics (for matching states to models)."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_heads": self.num_heads,
            "kv_heads": self.kv_heads,
            "head_k_dim": self.head_k_dim,
            "head_v_dim": self.head_v_dim,
            "ffn_size": self.ffn_size,
        }


PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: a few thousand parameters.
    "tiny": dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64),
    # The CPU default (~4.9M parameters).
    "small": dict(vocab_size=8192, hidden_size=192, num_hidden_layers=4, num_heads=4),
    # Shapes of fla-hub/retnet-1.3B-100B and fla-hub/retnet-2.7B-100B (Llama-2 tokenizer, 32000 tokens).
    "1.3B": dict(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_heads=8, bos_token_id=1, eos_token_id=2
    ),
    "2.7B": dict(
        vocab_size=32000, hidden_size=2560, num_hidden_layers=32, num_heads=10, bos_token_id=1, eos_token_id=2
    ),
}


def preset(name: str, **overrides: Any) -> RetNetConfig:
    """A named configuration (`tiny`, `small`, `1.3B`, `2.7B`), with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return RetNetConfig(**{**PRESETS[name], **overrides})
