"""The server's one Settings object (environment variables with the RETSERVE_ prefix)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.protocol import TokenDropping

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "checkpoints" / "retserve-small"
TENANT_RE = re.compile(r"[A-Za-z0-9_.@+=~-]{1,64}")
DEFAULT_TENANT = "default"
MIN_API_KEY_CHARS = 8


class Settings(BaseSettings):
    """Every knob of the server; each field is `RETSERVE_<NAME>` in the environment (README table)."""

    model_config = SettingsConfigDict(env_prefix="RETSERVE_", extra="ignore", frozen=True)

    # model
    model_path: Path = DEFAULT_MODEL
    model_name: str | None = None  # the id in /v1/models; default: the model directory's name
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on cuda, fp32 on cpu
    num_threads: int | None = None  # engine torch threads on CPU (None: torch's default)
    compile: bool = False  # torch.compile the decode step (docs/benchmarks.md)

    # state store
    store_url: str = "memory://"  # memory:// (embedded), redis://host:6379/0, redis+cluster://host:7000
    store_memory_bytes: int = Field(1 << 30, ge=1 << 20)  # memory store capacity (LRU beyond it)
    session_ttl_s: float | None = Field(7 * 86400.0, gt=0)  # idle sessions expire; None = never
    # a request's lease on its session: short, so a dead server's leases expire within seconds; renewed
    # every session_lock_renew_s (default: a third of the TTL) while the request runs
    session_lock_ttl_s: float = Field(5.0, gt=0)
    session_lock_renew_s: float | None = Field(None, gt=0)

    # auth and limits
    api_keys: dict[str, str] = {}  # {"api key": "tenant"}; empty = no auth, one tenant "default"
    rate_limit_per_s: float = Field(0.0, ge=0)  # requests per second per key (0 = unlimited)
    rate_limit_burst: int = Field(20, ge=1)
    max_prompt_tokens: int = Field(65536, ge=1)
    max_tokens_limit: int = Field(4096, ge=1)  # the largest max_tokens a request may ask for
    max_body_bytes: int = Field(8 << 20, ge=1024)  # JSON request bodies
    max_state_bytes: int = Field(512 << 20, ge=1024)  # imported state blobs (PUT /v1/sessions/{id}/state)
    # state uploads in flight at once (each spooled to disk while it arrives, then decoded in memory:
    # at most this many times max_state_bytes); more is a 503 + Retry-After before reading the body
    max_state_uploads: int = Field(2, ge=1)
    default_max_tokens: int = Field(16, ge=0)  # completions; chat uses max_tokens_limit's min with 256

    # engine
    max_running: int = Field(64, ge=1)
    max_waiting: int = Field(256, ge=1)
    max_queued_prompt_tokens: int = Field(1 << 20, ge=1)
    # the token dropping of requests that do not send `token_dropping` (a JSON object, e.g.
    # {"policy": "decayed", "keep": 0.5}); None: off. from_layer is checked against the model at startup
    token_dropping: TokenDropping | None = None

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    shutdown_timeout_s: float = Field(10.0, ge=0)  # on SIGTERM: wait this long for open streams
    playground: bool = True  # the web playground at GET / (server/static)

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key, tenant in v.items():
            if len(key) < MIN_API_KEY_CHARS:
                raise ValueError(
                    f"API keys must be at least {MIN_API_KEY_CHARS} characters long; one of"
                    f" RETSERVE_API_KEYS has {len(key)} (use long random keys, e.g. `openssl rand -hex 24`)"
                )
            if not TENANT_RE.fullmatch(tenant):
                raise ValueError(f"tenant {tenant!r}: use 1-64 characters from A-Z a-z 0-9 _ . @ + = ~ -")
        return v

    @field_validator("store_url")
    @classmethod
    def _check_store(cls, v: str) -> str:
        if not v.startswith(("memory://", "redis://", "rediss://", "redis+cluster://", "rediss+cluster://")):
            raise ValueError("store_url must start with memory://, redis://, rediss:// or redis+cluster://")
        return v

    @model_validator(mode="after")
    def _check_lease_renewal(self) -> Settings:
        if self.session_lock_renew_s is not None and self.session_lock_renew_s >= self.session_lock_ttl_s:
            raise ValueError(
                f"session_lock_renew_s ({self.session_lock_renew_s}) must be shorter than session_lock_ttl_s"
                f" ({self.session_lock_ttl_s}), or leases expire between renewals"
            )
        return self

    @property
    def lease_renew_interval_s(self) -> float:
        """How often a held session lease is renewed."""
        return self.session_lock_renew_s or self.session_lock_ttl_s / 3

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model_path).name

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)
