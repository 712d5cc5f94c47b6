"""The engine: a scheduler loop on its own thread, fed and drained thread-safely from asyncio.

Usage (from a coroutine)::

    engine = Engine(model, tokenizer, EngineConfig(max_running=64))
    stream = engine.submit(EngineRequest(prompt_ids, EngineSamplingParams(max_tokens=32)))
    async for out in stream:        # RequestOutput deltas; the last one has finished=True
        ...
    engine.shutdown()

`submit` fails fast with `EngineOverloaded` when the requests in the engine (running rows plus
waiting ones) would exceed `max_running + max_waiting`, or the unread prompt tokens would exceed
`max_queued_prompt_tokens`: nothing is ever queued without bound. Leaving the `async for` early (or
cancelling the consuming task) aborts the request, as does `abort(request_id)`.

The final output carries the request's `state` and that state's next-token `logits`;
`EngineRequest([], params, state, logits=logits)` continues from there without new input.
`EngineRequest(ids, params, dropping=DropSpec(...))` reads its prompt through a token-dropping policy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable

import torch

from model.retnet import RetNet
from model.tokenizer import Tokenizer
from server.engine.intake import accept_request
from server.engine.live import LiveRequest
from server.engine.runner import BatchRunner
from server.engine.types import (
    EngineConfig,
    EngineOverloaded,
    EngineRequest,
    IterationStats,
    RequestOutput,
    Usage,
)

log = logging.getLogger(__name__)


def _deliver(items: list[tuple[Callable[[RequestOutput], None], RequestOutput]]) -> None:
    for put, out in items:
        put(out)


class RequestStream:
    """Async iterator over one request's `RequestOutput` deltas."""

    def __init__(self, engine: Engine, request_id: str) -> None:
        self.engine = engine
        self.request_id = request_id
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                out = await self.queue.get()
                self.finished = out.finished
                yield out
        finally:
            if not self.finished:
                self.engine.abort(self.request_id)

    async def collect(self) -> tuple[list[int], str, RequestOutput]:
        """Every reported token id, the whole text, and the final output."""
        ids: list[int] = []
        text = ""
        async for out in self:
            ids += out.token_ids
            text += out.text
            if out.finished:
                return ids, text, out
        raise RuntimeError("stream ended without a final output")  # pragma: no cover

    def abort(self) -> None:
        self.engine.abort(self.request_id)


class Engine:
    """Continuous batching of RetNet requests; see the module docstring."""

    def __init__(
        self, model: RetNet, tokenizer: Tokenizer, config: EngineConfig | None = None, start: bool = True
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.stats: collections.deque[IterationStats] = collections.deque(maxlen=self.config.stats_history)
        self.iterations = 0  # iterations run (stats keeps only the last stats_history)
        self.consecutive_failures = 0  # iterations that raised since the last one that did not
        self._cond = threading.Condition()
        self._inbox: list[LiveRequest] = []
        self._aborts: list[str] = []
        self._stopping = False
        self._request_ids: set[str] = set()  # request ids submitted and not finished
        self._queued_tokens = 0  # prompt tokens not yet read
        self._live: dict[str, LiveRequest] = {}  # engine thread only
        # outputs of the current iteration, per event loop (engine thread only): one wake-up per
        # loop and iteration instead of one per output
        self._outbox: dict[
            asyncio.AbstractEventLoop, list[tuple[Callable[[RequestOutput], None], RequestOutput]]
        ] = {}
        self.error: BaseException | None = None
        self._runner = self._new_runner()
        self._thread = threading.Thread(target=self._loop, name="retserve-engine", daemon=True)
        if start:
            self._thread.start()

    def start(self) -> None:
        """Start the loop thread (only needed with `start=False`; requests submitted before wait)."""
        self._thread.start()

    # ---- public API (any thread; submit needs a running event loop) ----------------------------
    def submit(
        self, request: EngineRequest, sink: Callable[[RequestOutput], None] | None = None
    ) -> RequestStream:
        """Queue a request; its outputs arrive in the returned stream, or, with `sink`, are passed to
        `sink(output)` on the event loop instead (one task hop less per token; the stream is then
        only for `abort`). Raises ValueError for a bad request (saying what to fix), EngineOverloaded
        over the limits. A state or logits of another device / dtype are converted (not in place)."""
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request.request_id)
        put = sink or stream.queue.put_nowait

        def emit(out: RequestOutput) -> None:  # engine thread: delivered at the end of the iteration
            self._outbox.setdefault(loop, []).append((put, out))

        live = accept_request(request, self.model, self.tokenizer, emit)
        n = live.prompt_len
        c = self.config
        with self._cond:
            if self._stopping or self.error is not None:
                raise EngineOverloaded("the engine is shutting down")
            if request.request_id in self._request_ids:
                raise ValueError(f"request_id {request.request_id!r} is already in the engine; use a new id")
            if len(self._request_ids) >= c.max_running + c.max_waiting:
                raise EngineOverloaded(f"{len(self._request_ids)} requests in the engine (limit reached)")
            if self._queued_tokens + n > c.max_queued_prompt_tokens:
                raise EngineOverloaded(
                    f"{self._queued_tokens} prompt tokens queued; {n} more exceed the limit"
                )
            self._request_ids.add(request.request_id)
            self._queued_tokens += n
            self._inbox.append(live)
            self._cond.notify()
        return stream

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort every request (each gets its final output) and join the engine thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.ident is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def load(self) -> dict[str, int]:
        """Requests in the engine, unread prompt tokens, and rows held now (decoding or prefilling).

        `rows` is read without stopping the engine thread (list lengths), so it can be one
        iteration stale; `requests - rows` are waiting for a row.
        """
        sched = self._runner.sched
        with self._cond:
            return {
                "requests": len(self._request_ids),
                "queued_prompt_tokens": self._queued_tokens,
                "rows": min(len(self._request_ids), len(sched.running) + len(sched.prefilling)),
            }

    # ---- engine thread -------------------------------------------------------------------------
    def _unqueue_prompt_tokens(self, n: int) -> None:
        with self._cond:
            self._queued_tokens -= n

    def _released(self, live: LiveRequest) -> None:
        self._live.pop(live.request.request_id, None)
        with self._cond:
            self._request_ids.discard(live.request.request_id)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens any more
                loop.call_soon_threadsafe(_deliver, items)

    def _loop(self) -> None:
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)  # this thread's OpenMP team
        try:
            self._run()
        finally:
            self._flush()

    def _new_runner(self) -> BatchRunner:
        return BatchRunner(
            self.model, self.tokenizer, self.config, self._unqueue_prompt_tokens, self._released, self._flush
        )

    def _fail_all(self) -> None:
        """End every live request with finish reason "error" (no state: the batch may be
        inconsistent after a failed iteration, so sessions keep their previous state)."""
        for live in list(self._live.values()):  # every live request, wherever the failure left it
            if live.finish_reason is not None and not live.absorb_last:
                continue
            if live.prefilled < live.prompt_len:
                self._unqueue_prompt_tokens(live.prompt_len - live.prefilled)
            usage = Usage(live.prompt_len, live.detok.num_reported, live.dropped)
            live.emit(
                RequestOutput(
                    live.request.request_id, [], "", finished=True, finish_reason="error", usage=usage
                )
            )
            self._released(live)

    def _take_work(self) -> tuple[list[LiveRequest], list[str], bool]:
        """Wait for something to do: (new requests, request ids to abort, stopping)."""
        with self._cond:
            while not (self._inbox or self._aborts or self._stopping or self._runner.sched.has_work()):
                self._cond.wait()
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
            return inbox, aborts, self._stopping

    def _serve(self, aborts: list[str], stopping: bool) -> bool:
        """Apply aborts, then run one iteration (or, stopping, end every request); True once stopped."""
        runner = self._runner
        for rid in aborts:
            live = self._live.get(rid)
            if live is not None:
                runner.abort(live)
        if stopping:
            runner.abort_all()
            return True
        if runner.sched.has_work():
            self.stats.append(runner.step())
            self.consecutive_failures = 0
            self.iterations += 1
        return False

    def _run(self) -> None:
        try:
            self._runner.decode_step.warmup()  # compiles on this thread before the first request
            while True:
                inbox, aborts, stopping = self._take_work()
                for live in inbox:
                    self._live[live.request.request_id] = live
                    self._runner.sched.waiting.append(live)
                try:
                    if self._serve(aborts, stopping):
                        return
                except Exception:  # fail the batch's requests, keep serving (/ready reports a streak)
                    self.consecutive_failures += 1
                    self.iterations += 1
                    log.exception("engine iteration failed: its requests end with 'error'; batch reset")
                    self._fail_all()
                    self._runner = self._new_runner()
                self._flush()
        except BaseException as exc:  # keep the error; end every request rather than hang clients
            with self._cond:
                self.error = exc
                self._stopping = True
                inbox, self._inbox = self._inbox, []
            for live in inbox:
                self._live[live.request.request_id] = live
            self._fail_all()
            log.exception("engine loop failed; every request was ended (error) and submit now refuses")
