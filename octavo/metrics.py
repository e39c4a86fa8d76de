"""Prometheus metrics for the serving engine, named like vLLM's under the ``octavo:`` prefix.

Each ``EngineMetrics`` owns its own ``CollectorRegistry`` rather than the process-global one,
so several servers (or tests) in one process never clash over metric names. The engine's step
thread updates the metrics; prometheus-client's collectors are thread-safe, and ``/metrics``
renders the registry from the event loop.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_PER_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                      10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class EngineMetrics:
    """The serving metrics of one model, labelled with its served name."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self._model_name = model_name
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.num_requests_running = gauge("octavo:num_requests_running",
                                          "Requests with a sequence running on the engine.")
        self.num_requests_waiting = gauge("octavo:num_requests_waiting",
                                          "Requests waiting to be scheduled, none of their sequences running.")
        self.kv_cache_usage = gauge("octavo:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).")
        self.kv_cache_shared_blocks = gauge("octavo:kv_cache_shared_blocks",
                                            "KV cache blocks referenced by more than one sequence.")
        self.kv_cache_blocks_saved_by_sharing = gauge(
            "octavo:kv_cache_blocks_saved_by_sharing",
            "KV cache blocks that sharing saves: references to shared blocks beyond the first.")
        self.prefix_cache_queries = counter("octavo:prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("octavo:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("octavo:prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("octavo:generation_tokens", "Tokens generated.")
        self._request_success = Counter("octavo:request_success", "Requests finished, by finish reason.",
                                        ["model_name", "finished_reason"], registry=self.registry)
        self.time_to_first_token = histogram("octavo:time_to_first_token_seconds",
                                             "Arrival to first generated token.", _LATENCY_BUCKETS)
        self.time_per_output_token = histogram("octavo:time_per_output_token_seconds",
                                               "Time between consecutive output tokens of a request, one "
                                               "observation per decode step.", _PER_TOKEN_BUCKETS)
        self.e2e_request_latency = histogram("octavo:e2e_request_latency_seconds",
                                             "Arrival to last token.", _REQUEST_BUCKETS)
        self.request_queue_time = histogram("octavo:request_queue_time_seconds",
                                            "Arrival to first scheduling.", _REQUEST_BUCKETS)
        self._prefix_totals = (0, 0)

    def set_scheduler_state(self, num_running: int, num_waiting: int, kv_cache_usage: float) -> None:
        self.num_requests_running.set(num_running)
        self.num_requests_waiting.set(num_waiting)
        self.kv_cache_usage.set(kv_cache_usage)

    def set_kv_sharing(self, num_shared_blocks: int, blocks_saved: int) -> None:
        self.kv_cache_shared_blocks.set(num_shared_blocks)
        self.kv_cache_blocks_saved_by_sharing.set(blocks_saved)

    def set_prefix_cache_totals(self, queries: int, hits: int) -> None:
        """Advance the counters to the engine's running totals (the engine keeps totals, not deltas)."""
        seen_queries, seen_hits = self._prefix_totals
        self.prefix_cache_queries.inc(max(0, queries - seen_queries))
        self.prefix_cache_hits.inc(max(0, hits - seen_hits))
        self._prefix_totals = (queries, hits)

    def record_finished(self, finished_reason: str, e2e_latency: Optional[float] = None,
                        queue_time: Optional[float] = None) -> None:
        self._request_success.labels(self._model_name, finished_reason).inc()
        for histogram, value in ((self.e2e_request_latency, e2e_latency), (self.request_queue_time, queue_time)):
            if value is not None:
                histogram.observe(value)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
