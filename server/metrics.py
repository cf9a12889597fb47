"""Prometheus metrics with vLLM's names under a ``kiln:`` prefix, one registry per app.

Gauges and cumulative engine counters are read from the engine's latest EngineStats when
/metrics is scraped (a custom collector), so they can never drift from the engine. Per-request
histograms are observed by the engine thread as outputs arrive (prometheus_client is
thread-safe).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "kiln:"

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)


class _EngineStatsCollector(Collector):
    """Exposes the engine's EngineStats snapshot as gauges and counters."""

    def __init__(self, stats: Callable[[], Any], model_name: str) -> None:
        self._stats = stats
        self._model = model_name

    def collect(self) -> Iterator[Any]:
        s = self._stats()
        labels = ["model_name"]
        gauges = {
            "num_requests_running": ("Requests in the running batch.", s.num_running),
            "num_requests_waiting": ("Requests waiting to be scheduled.", s.num_waiting),
            "kv_cache_usage_perc": ("Fraction of KV cache blocks in use (0..1).", s.kv_cache_usage),
            "num_batch_slots_used": ("Runner batch slots held (released the step after a request ends).",
                                     s.num_batch_slots_used),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric([self._model], float(value))
            yield g
        counters = {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            "prefix_cache_hits": ("Prompt tokens served from the prefix cache.", s.prefix_cache_hits),
            "num_preemptions": ("Requests preempted for lack of KV cache.", s.num_preemptions),
            "prompt_tokens": ("Prompt tokens processed.", s.prompt_tokens),
            "generation_tokens": ("Tokens generated.", s.generation_tokens),
        }
        for name, (doc, value) in counters.items():
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            c.add_metric([self._model], float(value))
            yield c


class ServerMetrics:
    """All of one app's metrics. ``on_output`` / ``on_abort`` run on the engine thread."""

    def __init__(self, stats: Callable[[], Any], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(stats, model_name))
        labels = {"model_name": model_name}
        self._labels = labels
        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests (per choice) by finish reason.",
            ["model_name", "finished_reason"], registry=self.registry,
        )
        hist = lambda name, doc: Histogram(  # noqa: E731
            PREFIX + name, doc, ["model_name"], buckets=_LATENCY_BUCKETS, registry=self.registry
        ).labels(**labels)
        self.ttft = hist("time_to_first_token_seconds", "Time to first token.")
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output steps.")
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.")
        self.queue_time = hist("request_queue_time_seconds", "Arrival to first scheduling.")
        self._last_token_time: dict[str, float] = {}

    def on_output(self, out: Any, now: float) -> None:
        """Observe one RequestOutput (engine thread)."""
        rid = out.request_id
        if any(c.delta_token_ids for c in out.outputs):
            last = self._last_token_time.get(rid)
            if last is None:
                ttft = out.metrics.time_to_first_token
                self.ttft.observe(ttft if ttft is not None else now - out.metrics.arrival_time)
            else:
                self.itl.observe(now - last)
            self._last_token_time[rid] = now
        for c in out.outputs:
            if c.finish_reason is not None:
                self.request_success.labels(model_name=self._labels["model_name"],
                                            finished_reason=c.finish_reason).inc()
        if out.finished:
            self._last_token_time.pop(rid, None)
            self.e2e.observe(now - out.metrics.arrival_time)
            if out.metrics.queue_time is not None:
                self.queue_time.observe(out.metrics.queue_time)

    def forget(self, request_id: str) -> None:
        """Drop the per-request state of a request that ends without a final output (engine thread)."""
        self._last_token_time.pop(request_id, None)

    def on_abort(self, request_id: str | None = None) -> None:
        """A client went away; its request ends as "abort" (engine thread)."""
        if request_id is not None:
            self.forget(request_id)
        self.request_success.labels(model_name=self._labels["model_name"], finished_reason="abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

