"""Prometheus metrics: vLLM's names under `retserve:` where they apply, plus sessions and the state store."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine import Engine, RequestOutput
from server.protocol import openai_finish_reason
from state_store import StoreMetrics, StoreMetricsCollector

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
E2E = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
MERGE_MODES = ("concat", "average")
SESSION_EVENTS = ("created", "primed", "resumed", "exported", "imported", "forked", "deleted")


class _EngineCollector(Collector):
    """Live gauges read from the engine at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        load = self.engine.load()
        rows = load["rows"]
        yield GaugeMetricFamily("retserve:num_requests_running", "Rows in the last decode batch.", value=rows)
        yield GaugeMetricFamily(
            "retserve:num_requests_waiting",
            "Requests in the engine that are not decoding yet.",
            value=max(0, load["requests"] - rows),
        )
        yield GaugeMetricFamily(
            "retserve:num_queued_prompt_tokens",
            "Prompt tokens not read yet.",
            value=load["queued_prompt_tokens"],
        )


class ServerMetrics:
    """One registry per app (so several apps can live in one process, as in tests)."""

    def __init__(self, store_metrics: StoreMetrics | None, engine: Engine) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "retserve:"
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Arrival to first token.", buckets=LATENCY, registry=r
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds", "Gap between tokens.", buckets=LATENCY, registry=r
        )
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Arrival to finish.", buckets=E2E, registry=r)
        self.queue = Histogram(
            p + "request_queue_time_seconds", "Arrival to first prefill.", buckets=E2E, registry=r
        )
        self.prefill = Histogram(
            p + "request_prefill_time_seconds", "First prefill chunk to prompt read.", buckets=E2E, registry=r
        )
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens read.", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Completion tokens reported.", registry=r)
        self.prompt_tokens_dropped = Counter(
            p + "prompt_tokens_dropped", "Prompt tokens token dropping left out of the state.", registry=r
        )
        self.success = Counter(p + "request_success", "Finished requests.", ["finished_reason"], registry=r)
        self.batch_size = Histogram(
            p + "batch_size", "Rows per decode step.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.sessions = Counter(p + "sessions", "Session events.", ["event"], registry=r)
        for e in SESSION_EVENTS:
            self.sessions.labels(event=e)
        self.merges = Counter(p + "session_merges", "Sessions made by merging others.", ["mode"], registry=r)
        for mode in MERGE_MODES:
            self.merges.labels(mode=mode)
        self.state_bytes = Histogram(
            p + "state_bytes",
            "Encoded session state sizes moved (saved, loaded, exported, imported).",
            buckets=tuple(float(1 << k) for k in range(10, 34, 2)),
            registry=r,
        )
        self.http_errors = Counter(p + "http_errors", "Error responses.", ["status"], registry=r)
        self.leases_unreleased = Gauge(  # the runtime sets its function (SessionService.pending)
            p + "session_leases_unreleased",
            "Session leases not released yet because the store was unreachable (retried in the background).",
            registry=r,
        )
        r.register(_EngineCollector(engine))
        if store_metrics is not None:
            r.register(StoreMetricsCollector(store_metrics, prefix="retserve:state_store"))
        self._seen_iterations = 0

    def request_finished(self, out: RequestOutput) -> None:
        t = out.timings
        if out.usage is not None:
            self.prompt_tokens.inc(out.usage.prompt_tokens)
            self.generation_tokens.inc(out.usage.completion_tokens)
            self.prompt_tokens_dropped.inc(out.usage.dropped_tokens)
        self.success.labels(finished_reason=openai_finish_reason(out.finish_reason or "abort")).inc()
        if t is None:
            return
        if t.queue_s is not None:
            self.queue.observe(t.queue_s)
        if t.prefill_s is not None:
            self.prefill.observe(t.prefill_s)
        for gap in t.inter_token_s:
            self.itl.observe(gap)
        if t.ttft_s is not None:
            self.ttft.observe(t.ttft_s)
            self.e2e.observe(t.ttft_s + sum(t.inter_token_s))  # arrival to the last token

    def observe_iterations(self, engine: Engine) -> None:
        """Batch sizes of the iterations run since the last call (called at scrape time)."""
        stats = list(engine.stats)
        total = engine.iterations
        new = min(len(stats), total - self._seen_iterations)
        for s in stats[len(stats) - new :] if new > 0 else []:
            if s.decode_rows:
                self.batch_size.observe(s.decode_rows)
        self._seen_iterations = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
