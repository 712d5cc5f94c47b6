"""Training configuration: one dataclass, loaded from YAML with command-line overrides."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class TrainConfigError(ValueError):
    """A training configuration value is missing or invalid."""


def absolute_path(path: str | Path, base: str | Path | None = None) -> Path:
    """``path`` as an absolute, normalised path (``~`` expanded; relative = below ``base`` or the cwd).

    Symlinks are kept as given. Resolving once, where a path enters, means no later step (a
    subprocess started elsewhere, a process that changed directory) depends on the working directory.
    """
    p = os.path.expanduser(os.fspath(path))
    if base is not None and not os.path.isabs(p):
        p = os.path.join(os.fspath(absolute_path(base)), p)
    return Path(os.path.abspath(p))


# The TrainConfig fields that name directories.
PATH_FIELDS = ("data_dir", "tokenizer_dir", "out_dir")


@dataclass
class TrainConfig:
    # model
    arch: str = "retnet"  # "retnet" or "transformer" (the GPT-style baseline)
    preset: str = "small"  # a model.config preset (for transformer: model.transformer preset)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # data: a directory written by `prepare` + `tokenize` (train.bin, val.bin, tokens.json)
    data_dir: str = "data/builtin/tokens"
    tokenizer_dir: str = "data/tokenizer"
    out_dir: str = "runs/small"
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-step per process
    grad_accum: int = 1
    # optimisation
    max_steps: int = 1000
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit
    stop_at_step: int = 0  # stop (and checkpoint) at this step, keeping max_steps' schedule; 0 = off
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # bookkeeping
    eval_interval: int = 100
    eval_batches: int = 20
    log_interval: int = 10
    ckpt_interval: int = 200
    sample_prompt: str = "The "
    sample_tokens: int = 48
    seed: int = 1337
    retention_mode: str = "chunk"  # RetNet training form: "chunk" or "parallel"
    chunk_size: int = 64
    compile: bool = False  # opt-in torch.compile of the model
    device: str = "auto"  # "auto" = cuda when available, else cpu
    threads: int = 0  # torch intra-op threads on CPU (0 = torch default)
    tensorboard: bool = True  # when the tensorboard package is installed

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise TrainConfigError(msg)

        need(
            self.arch in ("retnet", "transformer"),
            f"arch must be 'retnet' or 'transformer', got {self.arch!r}",
        )
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "log_interval"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_interval", "ckpt_interval", "warmup_steps"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"need 0 < lr and 0 <= min_lr <= lr ({self})")
        need(self.retention_mode in ("chunk", "parallel"), "retention_mode must be 'chunk' or 'parallel'")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        p = config_path(path)
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise TrainConfigError(f"{p} must hold a YAML mapping")
        return cls.from_dict({**data, **(overrides or {})})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise TrainConfigError(f"unknown training config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self, base: str | Path | None = None) -> TrainConfig:
        """A copy whose directories (data_dir, tokenizer_dir, out_dir) are absolute: relative ones are
        taken below ``base`` (default: the current working directory, as the shipped configs mean)."""
        return dataclasses.replace(
            self, **{k: str(absolute_path(getattr(self, k), base)) for k in PATH_FIELDS}
        )


def config_path(path: str | Path) -> Path:
    """The absolute path of a training config: a YAML file, or the name of a shipped one (``small``)."""
    p = absolute_path(path)
    if not p.is_file() and (CONFIG_DIR / f"{path}.yaml").is_file():
        p = CONFIG_DIR / f"{path}.yaml"  # a bare name means a shipped config
    if not p.is_file():
        raise TrainConfigError(f"no training config at {path} (shipped: {sorted(shipped_configs())})")
    return p


def shipped_configs() -> list[str]:
    return [p.stem for p in CONFIG_DIR.glob("*.yaml")]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs from the command line; values parsed as YAML scalars (3e-4, true, 128)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise TrainConfigError(f"override {item!r} must look like key=value")
        k, v = item.split("=", 1)
        value = yaml.safe_load(v)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        out[k.strip()] = value
    return out
