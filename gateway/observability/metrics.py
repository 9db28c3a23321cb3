"""Prometheus metrics: one `GatewayMetrics` (and one CollectorRegistry) per app, no global state.

    metrics = GatewayMetrics(engines=registry.engines, store=lambda: state.get("store"))
    AuditMiddleware(app, audit_log, append=metrics.observing(audit_log.append))  # requests, latency
    ChatService(registry, limits, metrics=metrics)  # tokens, time to first token
    body, content_type = metrics.render(request.headers.get("accept", ""))  # GET /metrics

Request counts and latencies come from the audit record (so both agree on status, including 499 for a client
that went away, and there is one place that sees every request).  Engine load and fine-tuning state are read
when scraped, not pushed.  Labels are bounded and content-free: the route *template* (never the raw path of
an unrouted request), the method, the status, the base model and whether a fine-tuned adapter answered (never
the fine-tuned model's id, which names a tenant).  No prompt, completion, file or training row reaches here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from gateway.engine.base import Engine

__all__ = ["JOB_STATUSES", "GatewayMetrics", "ModelKind"]

log = structlog.get_logger(__name__)

UNMATCHED_ROUTE = "(unmatched)"
JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
ModelKind = str  # "base" | "fine_tuned"

# Seconds.  Requests span health checks (sub-millisecond) to long streamed completions (minutes).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class _EngineCollector(Collector):
    """Running and queued sequences, capacity and loaded adapters, read from `engine.stats()` per scrape."""

    def __init__(self, engines: Callable[[], Iterable[Engine]]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "running": GaugeMetricFamily(
                "gateway_engine_running_sequences", "Sequences being decoded now.", labels=["model"]
            ),
            "queued": GaugeMetricFamily(
                "gateway_engine_queued_sequences", "Requests waiting for a decoding slot.", labels=["model"]
            ),
            "max_running": GaugeMetricFamily(
                "gateway_engine_max_running_sequences",
                "Decoding slots (engine.max_running).",
                labels=["model"],
            ),
            "max_queued": GaugeMetricFamily(
                "gateway_engine_max_queued_sequences",
                "Queue capacity; past it requests get 429 (engine.max_queued).",
                labels=["model"],
            ),
            "prefill_token_budget": GaugeMetricFamily(
                "gateway_engine_prefill_token_budget",
                "Prompt tokens one engine step may prefill (engine.prefill_token_budget, sized at start-up).",
                labels=["model"],
            ),
            "kv_cache_tokens": GaugeMetricFamily(
                "gateway_engine_kv_cache_capacity_tokens",
                "Tokens the KV cache holds: decoding slots x models.max_model_len.",
                labels=["model"],
            ),
            "kv_cache_bytes": GaugeMetricFamily(
                "gateway_engine_kv_cache_capacity_bytes",
                "Bytes of the KV cache at full length (within engine.memory_fraction of free memory).",
                labels=["model"],
            ),
            "adapters": GaugeMetricFamily(
                "gateway_engine_loaded_adapters", "LoRA adapters loaded in the engine now.", labels=["model"]
            ),
            "failed_steps": CounterMetricFamily(
                "gateway_engine_failed_steps",
                "Engine steps that failed; their requests got a 500 and the engine went on.",
                labels=["model"],
            ),
            "restarts": CounterMetricFamily(
                "gateway_engine_restarts",
                "Times the engine rebuilt its model runner after failed steps in a row.",
                labels=["model"],
            ),
        }
        for engine in list(self._engines()):
            try:
                stats = engine.stats()
            except Exception as exc:  # an engine still loading or shutting down: skip it, keep the scrape
                log.warning(
                    "metrics.engine_stats_failed", model=engine.model_name, error_type=type(exc).__name__
                )
                continue
            for key, family in families.items():
                family.add_metric([engine.model_name], float(getattr(stats, key)))
        yield from families.values()


class _FinetuneCollector(Collector):
    """Fine-tuning jobs by status and the training throughput of running jobs, read from the store.

    `store()` returns the app's `gateway.store.Store` or None (no store configured, or not opened yet); then
    these families are simply absent.  Only `store.db.query` is used, read-only.
    """

    def __init__(self, store: Callable[[], Any]) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        store = self._store()
        if store is None:
            return
        try:
            counts = {row["status"]: int(row["n"]) for row in store.db.query(_JOBS_BY_STATUS)}
            rows = store.db.query(_LATEST_RUNNING_METRICS)
        except Exception as exc:  # a locked or migrating database must not fail the whole scrape
            log.warning("metrics.store_read_failed", error_type=type(exc).__name__)
            return
        jobs = GaugeMetricFamily("gateway_finetune_jobs", "Fine-tuning jobs by status.", labels=["status"])
        for status in (*JOB_STATUSES, *sorted(set(counts) - set(JOB_STATUSES))):
            jobs.add_metric([status], float(counts.get(status, 0)))
        yield jobs
        yield GaugeMetricFamily(
            "gateway_finetune_tokens_per_second",
            "Training tokens per second, summed over running jobs (latest logging step each); 0 when idle.",
            value=sum(_tokens_per_second(row["data"]) for row in rows),
        )


class _WorkerCollector(Collector):
    """Whether the fine-tuning worker `gateway serve` runs is up, and how often it was restarted."""

    def __init__(self, worker: Any) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "gateway_finetune_worker_up",
            "1 while the fine-tuning worker process this gateway runs is alive, 0 while it is down.",
            value=1.0 if self._worker.up else 0.0,
        )
        yield CounterMetricFamily(
            "gateway_finetune_worker_restarts",
            "Times the fine-tuning worker process was started again after it exited.",
            value=float(self._worker.restarts),
        )


_JOBS_BY_STATUS = "SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"
_LATEST_RUNNING_METRICS = (
    "SELECT data FROM job_events WHERE seq IN ("
    " SELECT MAX(seq) FROM job_events WHERE type = 'metrics'"
    " AND job_id IN (SELECT id FROM jobs WHERE status = 'running') GROUP BY job_id)"
)


def _tokens_per_second(raw: Any) -> float:
    try:
        value = json.loads(raw).get("tokens_per_second") if raw else None
    except (ValueError, AttributeError):
        return 0.0
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


class GatewayMetrics:
    def __init__(
        self,
        *,
        engines: Callable[[], Iterable[Engine]] = tuple,
        store: Callable[[], Any] | None = None,
        worker: Any = None,
        process: bool = True,
    ) -> None:
        """`worker`: the WorkerSupervisor of the worker process this gateway runs (None: it runs none)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_http_requests",
            "HTTP requests by route template, method and final status (499: the client went away).",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "gateway_http_request_duration_seconds",
            "Time from request to the last byte sent (streams included).",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gateway_prompt_tokens", "Prompt tokens processed.", ["model", "kind"], registry=r
        )
        self.completion_tokens = Counter(
            "gateway_completion_tokens", "Completion tokens generated.", ["model", "kind"], registry=r
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Streamed responses: time from the request reaching the service to its first content token.",
            ["model", "kind"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engines))
        if store is not None:
            r.register(_FinetuneCollector(store))
        if worker is not None:
            r.register(_WorkerCollector(worker))
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    # -- requests (from the audit record) ----------------------------------------------------------------

    def observe_request(self, record: dict[str, Any]) -> None:
        """One finished request as AuditMiddleware records it (route, action, method, status, duration_ms)."""
        # An unrouted request's "route" is its raw path: unbounded and caller-chosen, so never a label.
        route = record.get("route") if record.get("action") else UNMATCHED_ROUTE
        method = str(record.get("method") or "")
        self.requests.labels(str(route), method, str(record.get("status"))).inc()
        duration = record.get("duration_ms")
        if isinstance(duration, int | float):
            self.latency.labels(str(route), method).observe(duration / 1000)

    def observing(self, append: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        """Wrap the audit log's append: count the request, then write the record."""

        def observe_and_append(record: dict[str, Any]) -> Any:
            try:
                self.observe_request(record)
            except Exception as exc:  # metrics never cost an audit record
                log.warning("metrics.observe_failed", error_type=type(exc).__name__)
            return append(record)

        return observe_and_append

    # -- generation (from serving/chat.py) ---------------------------------------------------------------

    def observe_usage(self, model: str, kind: ModelKind, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.labels(model, kind).inc(max(prompt_tokens, 0))
        self.completion_tokens.labels(model, kind).inc(max(completion_tokens, 0))

    def observe_first_token(self, model: str, kind: ModelKind, seconds: float) -> None:
        self.ttft.labels(model, kind).observe(seconds)

    # -- exposition --------------------------------------------------------------------------------------

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape body and its content type (Prometheus text 0.0.4 unless the scraper asks otherwise)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
