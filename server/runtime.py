"""The heavy things the app holds: model, tokenizer, engine, store, codec, metrics (built in lifespan)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import torch

from model.chat_template import ChatTemplateError
from model.checkpoint import CheckpointError, load_stored, load_tokenizer, stored_dtype
from model.retnet import RetNet
from model.tokenizer import TextTokenizer, TokenizerError
from server.chat import ChatFormat, load_chat_format
from server.dropping import to_spec
from server.engine import Engine, EngineConfig, EngineRequest, EngineSamplingParams
from server.metrics import ServerMetrics
from server.ratelimit import RateLimiter, make_limiter
from server.session_service import SessionService
from server.settings import Settings
from state_store import (
    MemoryStateStore,
    RedisStateStore,
    SessionStates,
    StateBounds,
    StateCodec,
    StateStore,
    StoreMetrics,
    model_fingerprint,
    state_bounds,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StartupError(RuntimeError):
    """The server cannot start with these settings (the message says which one to fix)."""


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(setting)
    except RuntimeError as e:
        raise StartupError(f"RETSERVE_DEVICE={setting!r} is not a device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StartupError(f"RETSERVE_DEVICE={setting!r} but CUDA is not available; use cpu or auto")
    return dev


def pick_dtype(setting: str, device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """`auto`: bf16 on cuda; on cpu the weights' stored dtype when it is bf16 (no upcast copy), else fp32."""
    if setting == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if stored == torch.bfloat16 else torch.float32
    return DTYPES[setting]


def make_store(settings: Settings, metrics: StoreMetrics) -> StateStore:
    url = settings.store_url
    if url.startswith("memory://"):
        return MemoryStateStore(settings.store_memory_bytes, metrics=metrics)
    cluster = "+cluster://" in url
    if cluster:
        url = url.replace("+cluster://", "://", 1)
    return RedisStateStore.from_url(
        url, cluster=cluster, metrics=metrics, socket_timeout=2.0, connect_timeout=1.0
    )


@dataclass
class Runtime:
    settings: Settings
    model: RetNet
    tokenizer: TextTokenizer
    chat: ChatFormat
    fingerprint: str
    engine: Engine
    store: StateStore
    states: SessionStates
    sessions: SessionService
    metrics: ServerMetrics
    limiter: RateLimiter
    device: torch.device
    started_at: float = field(default_factory=time.time)
    tasks: set[asyncio.Task] = field(default_factory=set)  # running background work of this app
    releaser: asyncio.Task | None = field(default=None, init=False)  # SessionService.retry_releases

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run `coro` as a task this runtime keeps a reference to (and waits for at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        """Stop the engine (every request ends as "abort" with its final state), let the running
        generations save their sessions (up to RETSERVE_SHUTDOWN_TIMEOUT_S), release what leases
        the store will take, then close the store."""
        await asyncio.to_thread(self.engine.shutdown)
        await asyncio.sleep(0)  # let the final outputs delivered by the engine thread start their saves
        running = self.tasks - {self.releaser}
        if running:
            await asyncio.wait(running, timeout=self.settings.shutdown_timeout_s)
        left = list(self.tasks)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        await self.sessions.flush_releases()
        await self.store.close()
        self.limiter.close()

    def start_background(self) -> None:
        """The lease-release retries (see SessionService.retry_releases)."""
        self.releaser = self.spawn(self.sessions.retry_releases())


def preflight(settings: Settings) -> torch.device:
    """Cheap checks before anything heavy starts (StartupError says which setting to fix); the device."""
    if not (settings.model_path / "config.json").is_file():
        raise StartupError(
            f"RETSERVE_MODEL_PATH={settings.model_path} has no config.json: point it at a model directory"
            " (the shipped one is checkpoints/retserve-small)"
        )
    return pick_device(settings.device)


@dataclass
class LoadedModel:
    model: RetNet  # on its device, in its serving dtype
    tokenizer: TextTokenizer
    chat: ChatFormat
    fingerprint: str
    bounds: StateBounds  # of the float32 weights: imported states and logits beyond them are refused
    device: torch.device


class _AsFloat32:
    """A weight whose `detach()` is its float32 copy, made only when the fingerprint reads it."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def detach(self) -> torch.Tensor:
        return self.t.detach().float()


class _Float32Weights:
    def __init__(self, model: RetNet) -> None:
        self.model = model

    def state_dict(self) -> dict[str, _AsFloat32]:
        return {k: _AsFloat32(v) for k, v in self.model.state_dict().items()}


def float32_fingerprint(model: RetNet) -> str:
    """`model_fingerprint` of the model with float32 weights (the definition every server and every saved
    state uses, whatever the stored or serving dtype), upcasting one weight at a time: no float32 copy of
    the whole model."""
    return model_fingerprint(_Float32Weights(model), model.config)  # type: ignore[arg-type]


def load_model(settings: Settings) -> LoadedModel:
    device = preflight(settings)
    path = settings.model_path
    try:  # the weights as stored (memory-mapped when large): the fingerprint's reference
        model = load_stored(path)
        tokenizer = load_tokenizer(path)
        chat = load_chat_format(path, tokenizer, model.config.eos_token_id)
    except (CheckpointError, TokenizerError, ChatTemplateError, ValueError, OSError) as e:
        raise StartupError(f"RETSERVE_MODEL_PATH={path}: {e}") from None
    fingerprint = float32_fingerprint(model)  # the same on every server of these files, any serving dtype
    bounds = state_bounds(model)
    model = model.to(device=device, dtype=pick_dtype(settings.dtype, device, stored_dtype(path))).eval()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise StartupError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
        )
    if settings.token_dropping is not None:
        try:
            to_spec(settings.token_dropping, model.config)
        except ValueError as e:
            raise StartupError(f"RETSERVE_TOKEN_DROPPING: {e}") from None
    return LoadedModel(model, tokenizer, chat, fingerprint, bounds, device)


async def start_runtime(settings: Settings) -> Runtime:
    threads = settings.num_threads or torch.get_num_threads()
    torch.set_num_threads(1)  # this (event loop) thread; the engine thread gets `threads` (see EngineConfig)
    loaded = await asyncio.to_thread(load_model, settings)
    model, tokenizer, fingerprint, device = loaded.model, loaded.tokenizer, loaded.fingerprint, loaded.device
    store_metrics = StoreMetrics()
    store = make_store(settings, store_metrics)
    engine = Engine(
        model,
        tokenizer,
        EngineConfig(
            max_running=settings.max_running,
            max_waiting=settings.max_waiting,
            max_queued_prompt_tokens=settings.max_queued_prompt_tokens,
            num_threads=threads if device.type == "cpu" else None,
            compile=settings.compile,
        ),
    )
    metrics = ServerMetrics(store_metrics, engine)
    states = SessionStates(store, StateCodec(model.config, fingerprint, bounds=loaded.bounds))
    rt = Runtime(
        settings=settings,
        model=model,
        tokenizer=tokenizer,
        chat=loaded.chat,
        fingerprint=fingerprint,
        engine=engine,
        store=store,
        states=states,
        sessions=SessionService(states, settings, metrics.state_bytes),
        metrics=metrics,
        limiter=make_limiter(settings),  # shared by the replicas when the store is Redis
        device=device,
    )
    metrics.leases_unreleased.set_function(lambda: len(rt.sessions.pending))
    rt.start_background()
    # warm-up: one short request through the whole engine path
    ids = tokenizer.encode("Hello")
    await engine.submit(EngineRequest(ids, EngineSamplingParams(temperature=0, max_tokens=2))).collect()
    try:
        await store.ping()
    except Exception as e:  # the server still starts: stateless completions work; /ready says why
        log.warning("state store not reachable at startup: %s", e)
    log.info(
        "retserve ready: model %s (%s params, %s, %s), store %s, fingerprint %s",
        settings.served_model_name,
        f"{model.num_parameters():,}",
        device,
        str(model.dtype).removeprefix("torch."),
        settings.store_url.split("@")[-1],
        fingerprint,
    )
    return rt
