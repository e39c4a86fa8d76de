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


class _Summed:
    """One metric's per-replica series and, with several replicas, a ``replica="total"`` series
    holding their sum (gauges: the sum of the latest values; counters: of the increments)."""

    def __init__(self, family, model_name: str, num_replicas: int) -> None:
        self.children = [family.labels(model_name, str(index)) for index in range(num_replicas)]
        self.total = family.labels(model_name, "total") if num_replicas > 1 else None
        self.values = [0.0] * num_replicas

    def set(self, replica: int, value: float) -> None:
        self.children[replica].set(value)
        if self.total is not None:
            self.values[replica] = value
            self.total.set(sum(self.values))

    def inc(self, replica: int, amount: float = 1.0) -> None:
        self.children[replica].inc(amount)
        if self.total is not None:
            self.total.inc(amount)

    def bound(self, replica: int):
        """What one replica updates: its own series when there is no total to keep."""
        return self.children[replica] if self.total is None else _Bound(self, replica)


class _Bound:
    """A ``_Summed`` seen from one replica: ``inc`` and ``set`` as on a plain metric."""

    def __init__(self, summed: _Summed, replica: int) -> None:
        self._summed, self._replica = summed, replica

    def set(self, value: float) -> None:
        self._summed.set(self._replica, value)

    def inc(self, amount: float = 1.0) -> None:
        self._summed.inc(self._replica, amount)


class EngineMetrics:
    """The serving metrics of one model, labelled with its served name and the engine replica.

    With data parallelism each replica has its own series (``replica="0"``, ``"1"``, ...), and the
    gauges and counters whose sums mean something also have a ``replica="total"`` series (KV usage
    and the latency histograms are per replica only). Aggregate in PromQL with
    ``{replica="total"}``, or sum ``{replica!="total"}``.
    """

    def __init__(self, model_name: str, num_replicas: int = 1) -> None:
        self._model_name = model_name
        self.set_num_replicas(num_replicas)

    def set_num_replicas(self, num_replicas: int) -> None:
        """Start afresh with this many replicas' series (the engine calls this as it starts)."""
        self.registry = CollectorRegistry()
        self.num_replicas = num_replicas
        labels = ["model_name", "replica"]

        def summed(kind, name: str, doc: str) -> _Summed:
            return _Summed(kind(name, doc, labels, registry=self.registry), self._model_name, num_replicas)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.num_requests_running = summed(Gauge, "octavo:num_requests_running",
                                           "Requests with a sequence running on the engine.")
        self.num_requests_waiting = summed(Gauge, "octavo:num_requests_waiting",
                                           "Requests waiting to be scheduled, none of their sequences running.")
        self.kv_cache_usage = Gauge("octavo:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).",
                                    labels, registry=self.registry)
        self.kv_cache_shared_blocks = summed(Gauge, "octavo:kv_cache_shared_blocks",
                                             "KV cache blocks referenced by more than one sequence.")
        self.kv_cache_blocks_saved_by_sharing = summed(
            Gauge, "octavo:kv_cache_blocks_saved_by_sharing",
            "KV cache blocks that sharing saves: references to shared blocks beyond the first.")
        self.prefix_cache_queries = summed(Counter, "octavo:prefix_cache_queries",
                                           "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = summed(Counter, "octavo:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prefill_tokens_computed = summed(Counter, "octavo:prefill_tokens_computed",
                                              "Prompt tokens the model computed (prefix-cache hits are not).")
        self.prompt_tokens = summed(Counter, "octavo:prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = summed(Counter, "octavo:generation_tokens", "Tokens generated.")
        self.request_success = Counter("octavo:request_success", "Requests finished, by finish reason.",
                                       ["model_name", "replica", "finished_reason"], registry=self.registry)
        self.time_to_first_token = histogram("octavo:time_to_first_token_seconds",
                                             "Arrival to first generated token.", _LATENCY_BUCKETS)
        self.time_per_output_token = histogram("octavo:time_per_output_token_seconds",
                                               "Time between consecutive output tokens of a request, one "
                                               "observation per decode step.", _PER_TOKEN_BUCKETS)
        self.e2e_request_latency = histogram("octavo:e2e_request_latency_seconds",
                                             "Arrival to last token.", _REQUEST_BUCKETS)
        self.request_queue_time = histogram("octavo:request_queue_time_seconds",
                                            "Arrival to first scheduling.", _REQUEST_BUCKETS)
        self._replicas = [ReplicaMetrics(self, index) for index in range(num_replicas)]

    def replica(self, index: int) -> ReplicaMetrics:
        return self._replicas[index]

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class ReplicaMetrics:
    """What one replica's requests and stats update."""

    def __init__(self, metrics: EngineMetrics, replica: int) -> None:
        model, label = metrics._model_name, str(replica)
        self._metrics, self._label, self._replica = metrics, label, replica
        self.prompt_tokens = metrics.prompt_tokens.bound(replica)
        self.generation_tokens = metrics.generation_tokens.bound(replica)
        self.time_to_first_token = metrics.time_to_first_token.labels(model, label)
        self.time_per_output_token = metrics.time_per_output_token.labels(model, label)
        self._e2e = metrics.e2e_request_latency.labels(model, label)
        self._queue = metrics.request_queue_time.labels(model, label)
        self._kv_cache_usage = metrics.kv_cache_usage.labels(model, label)
        self._totals = (0, 0, 0)  # prefix queries, prefix hits, prefill tokens computed

    def set_scheduler_state(self, num_running: int, num_waiting: int, kv_cache_usage: float) -> None:
        self._metrics.num_requests_running.set(self._replica, num_running)
        self._metrics.num_requests_waiting.set(self._replica, num_waiting)
        self._kv_cache_usage.set(kv_cache_usage)

    def set_kv_sharing(self, num_shared_blocks: int, blocks_saved: int) -> None:
        self._metrics.kv_cache_shared_blocks.set(self._replica, num_shared_blocks)
        self._metrics.kv_cache_blocks_saved_by_sharing.set(self._replica, blocks_saved)

    def set_core_totals(self, queries: int, hits: int, prefill_computed: int) -> None:
        """Advance the counters to the core's running totals (the core keeps totals, not deltas)."""
        metrics = self._metrics
        counters = (metrics.prefix_cache_queries, metrics.prefix_cache_hits, metrics.prefill_tokens_computed)
        new = (queries, hits, prefill_computed)
        for counter, value, seen in zip(counters, new, self._totals):
            counter.inc(self._replica, max(0, value - seen))
        self._totals = new

    def record_finished(self, finished_reason: str, e2e_latency: Optional[float] = None,
                        queue_time: Optional[float] = None) -> None:
        metrics = self._metrics
        metrics.request_success.labels(metrics._model_name, self._label, finished_reason).inc()
        if metrics.num_replicas > 1:
            metrics.request_success.labels(metrics._model_name, "total", finished_reason).inc()
        for histogram, value in ((self._e2e, e2e_latency), (self._queue, queue_time)):
            if value is not None:
                histogram.observe(value)
