"""Helpers shared by the state-store tests (this module holds no tests).

Redis tests talk to a real Redis: REDIS_URL (default redis://127.0.0.1:6379), under a key prefix
unique to the run that is deleted afterwards. Without a reachable Redis they are skipped, except
under CI=true where that is a failure. Fault tests start their own redis-server on a free port.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest
import redis
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from model.config import RetNetConfig, preset
from model.retnet import RetNet
from model.state import RetentionState
from state_store import StateCodec, StateCodecError, model_fingerprint
from state_store.header import CHECKSUM_KEY, CHECKSUM_PLACEHOLDER, META_KEY, seal

T = TypeVar("T")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test's coroutine in a fresh event loop (the project does not use pytest-asyncio)."""
    return asyncio.run(coro)


# ---- model, states, codec --------------------------------------------------------------------
@functools.cache
def tiny_model() -> RetNet:
    torch.manual_seed(0)
    return RetNet(preset("tiny")).eval()


@functools.cache
def tiny_fingerprint() -> str:
    return model_fingerprint(tiny_model())


def tiny_codec(**kw: Any) -> StateCodec:
    return StateCodec(tiny_model().config, tiny_fingerprint(), **kw)


def tiny_state(batch: int = 1, tokens: int = 9, seed: int = 0) -> RetentionState:
    """A real state: the tiny model after reading `tokens` random tokens per row."""
    ids = torch.randint(0, 512, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # not inference_mode: tests edit these tensors in place
        _, state = tiny_model()(ids)
    return state


@functools.cache
def tiny_blob(seed: int = 0) -> bytes:
    # Fixed times: the header's length (and so the blob's) would otherwise vary with the clock.
    return tiny_codec().encode(tiny_state(seed=seed), created_at=1_700_000_000.0, updated_at=1_700_000_000.0)


def blob_parts(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(retserve header dict, tensors) of an encoded state, to craft variants from."""
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(json.loads(data[8 : 8 + n])["__metadata__"][META_KEY])
    return meta, st_load(data)


def craft_blob(meta: dict, tensors: dict[str, torch.Tensor], *, checksum: bool = True) -> bytes:
    """A blob of crafted content, with a valid checksum unless `checksum=False` (framing seal() cannot
    parse is left unsealed: it is refused before any checksum is read)."""
    metadata = {META_KEY: json.dumps(meta)}
    if checksum:
        metadata[CHECKSUM_KEY] = CHECKSUM_PLACEHOLDER
    blob = st_save(tensors, metadata=metadata)
    try:
        return seal(blob) if checksum else blob
    except StateCodecError:
        return blob


def big_config(layers: int = 8) -> RetNetConfig:
    """A config whose one-row state is `layers` x 512 KiB (4 MiB for 8 layers): for chunking tests."""
    return RetNetConfig(
        vocab_size=64, hidden_size=512, num_hidden_layers=layers, num_heads=4, intermediate_size=64
    )


# ---- shared Redis (REDIS_URL) ------------------------------------------------------------------
def redis_missing(msg: str) -> NoReturn:
    """Skip a Redis test, except under CI=true, where a missing Redis is a failure."""
    if IN_CI:
        pytest.fail(msg + " (CI=true: Redis tests may not be skipped)")
    pytest.skip(msg)


def require_redis(url: str = REDIS_URL) -> None:
    """Skip (or, under CI=true, fail) unless a Redis answers at `url`."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        client.ping()
        client.close()
    except redis.RedisError as e:
        redis_missing(f"no Redis reachable at REDIS_URL={url} ({e}); start one or set REDIS_URL")


def new_prefix() -> str:
    return f"retserve-test-{uuid.uuid4().hex[:12]}:"


def redis_keys(prefix: str, url: str = REDIS_URL) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match=prefix + "*", count=1000))
    finally:
        client.close()


def redis_cleanup(prefix: str, url: str = REDIS_URL) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])
    finally:
        client.close()


# ---- a redis-server of our own (fault tests) -------------------------------------------------
def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster_bus: bool = False) -> int:
    """A free TCP port; with cluster_bus, one whose +10000 (the Redis Cluster bus port) is free too."""
    if cluster_bus:
        for port in random.Random().sample(range(20000, 30000), 200):
            if _bindable(port) and _bindable(port + 10000):
                return port
        raise RuntimeError("no free port pair (p, p + 10000) for a Redis Cluster node")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process on a free port, without persistence; kill() in teardown."""

    def __init__(self, workdir: Path, extra: list[str] | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            redis_missing(
                "redis-server is not on PATH (install redis-server, e.g. apt-get install redis-server)"
            )
        self.exe = exe
        self.workdir = workdir
        self.extra = extra or []
        self.port = free_port(cluster_bus="--cluster-enabled" in self.extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
                client.ping()
                client.close()
                return
            except redis.RedisError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}") from None
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within 10 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case it was paused
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
