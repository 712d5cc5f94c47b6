"""Store metrics: operation counts by outcome, latency histograms and bytes moved.

`StoreMetrics` is plain Python (no global registry, safe to create many in tests). The server exposes
it with prometheus-client through `StoreMetricsCollector`:

    from prometheus_client import REGISTRY
    REGISTRY.register(StoreMetricsCollector(store.metrics))
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
OUTCOMES = ("ok", "miss", "conflict", "locked", "unavailable", "rejected", "error")


@dataclass
class _Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), + the +Inf bucket
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.total += v
        self.n += 1


@dataclass(frozen=True)
class OpStats:
    count: int
    seconds_total: float


class StoreMetrics:
    """Thread-safe counters; one instance per store (or shared by several, labelled by backend)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError("latency buckets must be a non-empty increasing sequence")
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._ops: dict[tuple[str, str, str], int] = {}
        self._latency: dict[tuple[str, str], _Histogram] = {}
        self._bytes: dict[tuple[str, str, str], int] = {}

    def observe(self, backend: str, op: str, outcome: str, seconds: float) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        with self._lock:
            k = (backend, op, outcome)
            self._ops[k] = self._ops.get(k, 0) + 1
            h = self._latency.get((backend, op))
            if h is None:
                h = self._latency[(backend, op)] = _Histogram(self.buckets)
            h.observe(seconds)

    def add_bytes(self, backend: str, op: str, direction: str, n: int) -> None:
        """`direction`: "written" (sent to the store) or "read" (returned by it)."""
        with self._lock:
            k = (backend, op, direction)
            self._bytes[k] = self._bytes.get(k, 0) + n

    # ---- reading ----------------------------------------------------------------------------
    def count(self, backend: str, op: str, outcome: str | None = None) -> int:
        with self._lock:
            return sum(
                n for (b, o, oc), n in self._ops.items() if b == backend and o == op and outcome in (None, oc)
            )

    def bytes(self, backend: str, op: str, direction: str) -> int:
        with self._lock:
            return self._bytes.get((backend, op, direction), 0)

    def latency(self, backend: str, op: str) -> OpStats:
        with self._lock:
            h = self._latency.get((backend, op))
            return OpStats(h.n, h.total) if h else OpStats(0, 0.0)

    def _copy(
        self,
    ) -> tuple[
        dict[tuple[str, str, str], int], dict[tuple[str, str], _Histogram], dict[tuple[str, str, str], int]
    ]:
        with self._lock:
            lat = {k: _Histogram(h.buckets, list(h.counts), h.total, h.n) for k, h in self._latency.items()}
            return dict(self._ops), lat, dict(self._bytes)


class StoreMetricsCollector(Collector):
    """A prometheus-client collector over a StoreMetrics (register it with a CollectorRegistry)."""

    def __init__(self, metrics: StoreMetrics, prefix: str = "retserve_state_store") -> None:
        self.metrics = metrics
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        ops, lat, nbytes = self.metrics._copy()
        c = CounterMetricFamily(
            f"{self.prefix}_operations",
            "State store operations by outcome",
            labels=["backend", "op", "outcome"],
        )
        for (b, o, oc), n in sorted(ops.items()):
            c.add_metric([b, o, oc], n)
        yield c
        h = HistogramMetricFamily(
            f"{self.prefix}_operation_seconds", "State store operation latency", labels=["backend", "op"]
        )
        for (b, o), hist in sorted(lat.items()):
            cum, buckets = 0, []
            for bound, n in zip([*map(str, hist.buckets), "+Inf"], hist.counts, strict=True):
                cum += n
                buckets.append((bound, cum))
            h.add_metric([b, o], buckets, hist.total)
        yield h
        by = CounterMetricFamily(
            f"{self.prefix}_bytes",
            "Bytes written to / read from the state store",
            labels=["backend", "op", "direction"],
        )
        for (b, o, d), n in sorted(nbytes.items()):
            by.add_metric([b, o, d], n)
        yield by
