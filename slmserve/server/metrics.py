"""Prometheus metrics: vLLM's names under an ``slmserve:`` prefix, one registry per application.

Nothing here runs per token or per step. Engine-wide gauges and counters are read from
``engine.stats()`` when Prometheus scrapes (a custom collector); per-request histograms and
counters are updated once per request, from the ``slmserve_request_finished`` hook, using the
time stamps the engine records anyway (histogram values are queued and bucketed in bulk at
scrape time, see :class:`BatchedHistogram`). A per-app ``CollectorRegistry`` (never the global one)
lets tests and embedders build many applications in one process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from slmserve.engine import AsyncEngine
from slmserve.hookspecs import hookimpl
from slmserve.server.engine_process import ProcessEngine

PREFIX = "slmserve:"
MAX_CLIENTS_PER_SERIES = 100
"""Client ids are chosen by callers; export only the largest this many per series."""

# Buckets follow vLLM's, extended downwards: small models answer in milliseconds.
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
    15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TOKEN_BUCKETS = tuple(float(2**i) for i in range(18))


class EngineCollector(Collector):
    """Engine gauges and cumulative counters, read from ``engine.stats()`` at scrape time."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        if not stats:  # not started yet
            return
        labels = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        yield gauge(
            "num_requests_running", "Requests in the running batch.", stats["requests_running"]
        )
        yield gauge(
            "num_requests_waiting", "Requests waiting to be scheduled.", stats["requests_waiting"]
        )
        yield gauge(
            "kv_cache_usage_perc", "Fraction of KV slots in use (1 = full).", stats["kv_usage"]
        )
        yield gauge("kv_cache_capacity_tokens", "KV pool size in tokens.", stats["kv_slots_total"])
        yield gauge(
            "kv_cache_cached_tokens",
            "Tokens held by the radix prefix cache.",
            stats["kv_slots_cached"],
        )
        yield counter(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            stats["prefix_cache_queries"],
        )
        yield counter(
            "prefix_cache_hits",
            "Prompt tokens found in the prefix cache (hit rate = rate(hits) / rate(queries)).",
            stats["prefix_cache_hits"],
        )
        yield counter(
            "prefill_tokens_computed",
            "Prompt tokens run through the model (cache hits excluded, recomputation included).",
            stats["prompt_tokens"],
        )
        yield counter("generation_tokens", "Tokens generated.", stats["generation_tokens"])
        yield counter("num_preemptions", "Requests preempted to free KV.", stats["preemptions"])
        yield counter(
            "evicted_tokens", "Tokens evicted from the prefix cache.", stats["evicted_tokens"]
        )
        times = self.engine.times
        yield counter("engine_steps", "Engine steps (model forward passes).", times.steps)
        yield counter(
            "engine_step_tokens",
            "Tokens run through the model by all steps (prefill chunks plus decode tokens).",
            times.tokens,
        )
        yield self._scheduler(stats.get("scheduler") or {})

    def _scheduler(self, series: dict[str, dict[str, float]]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            PREFIX + "scheduler_client_stat",
            "Per-client scheduler accounting (service tokens, deficits, ...), by series.",
            labels=["model_name", "series", "client"],
        )
        for name, per_client in series.items():
            top = sorted(per_client.items(), key=lambda kv: kv[1], reverse=True)
            for client, value in top[:MAX_CLIENTS_PER_SERIES]:
                family.add_metric([self.model_name, name, str(client)], float(value))
        return family


class BatchedHistogram(Collector):
    """A one-series Prometheus histogram whose observations are bucketed in bulk.

    ``observe`` only appends; the values are counted into buckets with one numpy call when
    Prometheus scrapes (or every ``FLUSH_EVERY`` values). prometheus-client's ``Histogram``
    scans its buckets in Python under a lock on every call: six of those per finished request
    cost the engine's loop ~20 us per request, this costs ~1 us. Same exposition: cumulative
    ``_bucket{le=...}`` series, ``_count`` and ``_sum``.
    """

    FLUSH_EVERY = 8192

    def __init__(self, name: str, doc: str, buckets: Sequence[float], model_name: str) -> None:
        self.name, self.doc, self.model_name = name, doc, model_name
        self.bounds = np.array([*buckets, math.inf])
        self.counts = np.zeros(len(self.bounds), dtype=np.int64)
        self.sum = 0.0
        self.pending: list[float] = []

    def observe(self, value: float) -> None:
        self.pending.append(value)
        if len(self.pending) >= self.FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        values = np.asarray(self.pending, dtype=np.float64)
        self.pending = []
        # Bucket i holds bounds[i-1] < v <= bounds[i] (Prometheus' ``le`` is inclusive).
        index = np.searchsorted(self.bounds, values, side="left")
        self.counts += np.bincount(index, minlength=len(self.bounds))
        self.sum += float(values.sum())

    def collect(self) -> Iterator[Metric]:
        self.flush()
        family = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        cumulative = np.cumsum(self.counts)
        buckets = [(floatToGoString(b), int(c)) for b, c in zip(self.bounds, cumulative)]
        family.add_metric([self.model_name], buckets, sum_value=self.sum)
        yield family


class Metrics:
    """The application's registry plus the per-request series, fed by the engine's hook."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))
        self._model = model_name
        reg = self.registry
        label = ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> BatchedHistogram:
            histogram = BatchedHistogram(PREFIX + name, doc, buckets, model_name)
            reg.register(histogram)
            return histogram

        self._success = Counter(
            PREFIX + "request_success",
            "Requests that left the engine, by finish reason (stop, length, abort, error).",
            ["model_name", "finished_reason"],
            registry=reg,
        )
        self._success_by_reason: dict[str, Any] = {}
        self._prompt_tokens = Counter(
            PREFIX + "prompt_tokens",
            "Prompt tokens of finished requests (prefix-cache hits included).",
            label,
            registry=reg,
        ).labels(model_name)
        self.ttft = hist(
            "time_to_first_token_seconds", "Arrival to first output token.", TTFT_BUCKETS
        )
        self.itl = hist(
            "inter_token_latency_seconds",
            "Mean gap between output tokens, one observation per request.",
            ITL_BUCKETS,
        )
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self.queue = hist(
            "request_queue_time_seconds", "Arrival to first scheduled.", LATENCY_BUCKETS
        )
        self.prompt_len = hist("request_prompt_tokens", "Prompt length per request.", TOKEN_BUCKETS)
        self.output_len = hist(
            "request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS
        )
        self._plugin_name = f"slmserve-server-metrics-{id(self):x}"

    # ------------------------------------------------------------------ lifecycle

    def attach(self) -> None:
        """Start receiving ``slmserve_request_finished`` from the engine's plugin manager."""
        if self.engine.plugins.pm.get_plugin(self._plugin_name) is None:
            self.engine.plugins.pm.register(self, name=self._plugin_name)

    def detach(self) -> None:
        if self.engine.plugins.pm.get_plugin(self._plugin_name) is not None:
            self.engine.plugins.pm.unregister(name=self._plugin_name)

    @hookimpl
    def slmserve_request_finished(self, engine: Any, request_id: str, info: dict[str, Any]) -> None:
        """Once per request: a few histogram observations, no per-token work."""
        if engine is not self.engine:
            return
        reason = str(info.get("finish_reason"))
        child = self._success_by_reason.get(reason)
        if child is None:
            child = self._success.labels(self._model, reason)
            self._success_by_reason[reason] = child
        child.inc()
        prompt_tokens = info.get("prompt_tokens") or 0
        output_tokens = info.get("output_tokens") or 0
        self._prompt_tokens.inc(prompt_tokens)
        self.prompt_len.observe(prompt_tokens)
        self.output_len.observe(output_tokens)
        arrival = info.get("arrival_time")
        finish = info.get("finish_time")
        if arrival is None or finish is None:
            return
        self.e2e.observe(max(0.0, finish - arrival))
        scheduled = info.get("first_scheduled_time")
        if scheduled is not None:
            self.queue.observe(max(0.0, scheduled - arrival))
        first = info.get("first_token_time")
        if first is not None:
            self.ttft.observe(max(0.0, first - arrival))
            if output_tokens > 1:
                self.itl.observe(max(0.0, finish - first) / (output_tokens - 1))

    # ------------------------------------------------------------------ exposition

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def exposition(self) -> bytes:
        """What ``GET /metrics`` returns."""
        return self.render()


class ChildMetrics:
    """``/metrics`` of a server whose engine runs in a child process.

    The child attaches a :class:`Metrics` to its engine (where the hooks fire and the stats
    live); the front only relays its text.
    """

    def __init__(self, engine: ProcessEngine) -> None:
        self.engine = engine

    def attach(self) -> None:
        """Nothing to do: the child attached its own."""

    def detach(self) -> None:
        """Nothing to do: the child detaches its own."""

    async def exposition(self) -> bytes:
        return await self.engine.metrics_text()


def metrics_for(engine: AsyncEngine | ProcessEngine, model_name: str) -> Metrics | ChildMetrics:
    """The application's metrics: here, or relayed from the engine's process."""
    if isinstance(engine, ProcessEngine):
        return ChildMetrics(engine)
    return Metrics(engine, model_name)
