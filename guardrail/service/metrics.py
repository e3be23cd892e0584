"""Every Prometheus metric of the guardrail, defined here and nowhere else.

Names follow Prometheus conventions: `guardrail_` prefix, base units (seconds), counters end in
`_total`. Labels are bounded: `model` comes from the configuration, `verdict` from the four
labels, `category` from the fixed object vocabulary plus `other` (never the raw word), `reason`
from fixed lists. Histograms are classic histograms with explicit buckets.

Multi-process deployments: `guardrail serve` supervises its audit workers and scheduler as
child processes; each child sends snapshots of its counters and histograms over a pipe and the
serve process merges them into its own `/metrics` (`ChildSnapshots`; a restarted child's totals
are kept, so counters never go back).  Each standalone `guardrail worker` process serves its own
registry on `--metrics-port`, and Prometheus sums over the targets.

The backlog (queue depth, running jobs, oldest job age, live workers) is global state: it is read
from the database at scrape time (`BacklogCollector`) by the serve processes only, never by
workers, so that it is right when no worker runs; with several serve replicas every replica
exports the same value, so dashboards and rules take `max()` of these gauges, never `sum()`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from detectors.objects import COCO_CATEGORIES, DEFAULT_VOCABULARY

__all__ = [
    "CATEGORIES",
    "SKIP_REASONS",
    "BacklogCollector",
    "ChildSnapshots",
    "Metrics",
    "category_label",
    "snapshot",
]

CATEGORIES: frozenset[str] = frozenset({*COCO_CATEGORIES, *DEFAULT_VOCABULARY.forms.values()})
SKIP_REASONS = ("rate", "rate_limited", "no_image", "unknown_model", "ingest_error")
AUDIT_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
PASSES_BUCKETS = (10, 25, 50, 100, 200, 400, 800, 1600, 3200, 6400)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# the proxy's route label: the first path segment under /v1 when it is one of these, else other
PROXY_ROUTES = (
    "chat_completions",
    "completions",
    "embeddings",
    "models",
    "responses",
    "moderations",
    "audio",
    "images",
    "files",
    "batches",
    "rerank",
    "score",
    "tokenize",
    "detokenize",
    "other",
)


def category_label(category: str) -> str:
    """The bounded `category` label value for an object category."""
    return category if category in CATEGORIES else "other"


@dataclass(frozen=True, slots=True)
class Metrics:
    registry: CollectorRegistry
    samples_received: Counter
    samples_sampled: Counter
    samples_skipped: Counter
    tokens_audited: Counter
    audits: Counter
    audit_failures: Counter
    audit_duration: Histogram
    audit_forward_passes: Histogram
    budget_exhaustions: Counter
    remote_requests: Counter
    remote_request_failures: Counter
    remote_request_seconds: Counter
    jobs_failed: Counter
    otel_spans: Counter
    otel_evaluations_truncated: Counter
    worker_restarts: Counter
    proxy_requests: Counter
    proxy_duration: Histogram
    proxy_time_to_first_byte: Histogram
    proxy_fail_open_drops: Counter
    proxy_not_applicable: Counter
    image_fetches: Counter
    proxy_tee_pending: Gauge
    proxy_tee_pending_bytes: Gauge
    alert_deliveries: Counter
    image_decoder_crashes: Counter
    backlog: BacklogCollector
    children: ChildSnapshots = field(default_factory=lambda: ChildSnapshots())

    def start_series(self, models: Iterable[str]) -> None:
        """Export the counters that alerts take `increase()` of at 0 from the start: a series
        born at its first increment hides that increment from `increase()`, so the first crash
        would never page."""
        from guardrail.service.alert_delivery import Outcome
        from storage.queue import FailureReason

        for kind in ("worker", "scheduler"):
            self.worker_restarts.labels(kind=kind)
        for outcome in Outcome.ALL:
            self.alert_deliveries.labels(outcome=outcome)
        for model in models:
            for reason in (
                FailureReason.INVALID_INPUT,
                FailureReason.ERROR,
                FailureReason.WORKER_CRASHED,
            ):
                self.jobs_failed.labels(model=model, reason=reason)
            self.audit_failures.labels(model=model)
            self.audits.labels(model=model)

    def merged_registry(self) -> CollectorRegistry:
        """A registry that collects this process's metrics merged with its children's."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(self.registry, self.children))
        return registry

    def exposition(self) -> bytes:
        """This process's metrics merged with its children's, in the text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.merged_registry())

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        r = registry if registry is not None else CollectorRegistry()
        return cls(
            registry=r,
            samples_received=Counter(
                "guardrail_samples_received_total",
                "Samples offered to ingest",
                ["model"],
                registry=r,
            ),
            samples_sampled=Counter(
                "guardrail_samples_sampled_total",
                "Samples accepted for audit (durably queued)",
                ["model"],
                registry=r,
            ),
            samples_skipped=Counter(
                "guardrail_samples_skipped_total",
                "Samples not audited, by reason",
                ["model", "reason"],
                registry=r,
            ),
            tokens_audited=Counter(
                "guardrail_tokens_audited_total",
                "Object tokens audited, by verdict and object category",
                ["model", "verdict", "category"],
                registry=r,
            ),
            audits=Counter(
                "guardrail_audits_total", "Samples audited to completion", ["model"], registry=r
            ),
            audit_failures=Counter(
                "guardrail_audit_failures_total",
                "Audit attempts that raised (scorer or input errors)",
                ["model"],
                registry=r,
            ),
            audit_duration=Histogram(
                "guardrail_audit_duration_seconds",
                "Wall time of one sample's audit",
                ["model"],
                buckets=AUDIT_SECONDS_BUCKETS,
                registry=r,
            ),
            audit_forward_passes=Histogram(
                "guardrail_audit_forward_passes",
                "Forward passes spent on one sample's audit",
                ["model"],
                buckets=PASSES_BUCKETS,
                registry=r,
            ),
            budget_exhaustions=Counter(
                "guardrail_budget_exhaustions_total",
                "Object tokens whose search stopped on its pass or time budget",
                ["model"],
                registry=r,
            ),
            remote_requests=Counter(
                "guardrail_remote_requests_total",
                "Requests sent to a remote model's server to score masked images (retries "
                "included; one per forward pass otherwise)",
                ["model"],
                registry=r,
            ),
            remote_request_failures=Counter(
                "guardrail_remote_request_failures_total",
                "Requests to a remote model's server answered with an error or not answered",
                ["model"],
                registry=r,
            ),
            remote_request_seconds=Counter(
                "guardrail_remote_request_seconds_total",
                "Seconds spent in requests to a remote model's server (summed over threads)",
                ["model"],
                registry=r,
            ),
            jobs_failed=Counter(
                "guardrail_jobs_failed_total",
                "Audit jobs that ended failed, by reason (invalid_input, error, worker_crashed)",
                ["model", "reason"],
                registry=r,
            ),
            otel_spans=Counter(
                "guardrail_otel_spans_total",
                "Verdict spans for OpenTelemetry export, by outcome (exported, failed, "
                "queue_full, stopped, error)",
                ["outcome"],
                registry=r,
            ),
            otel_evaluations_truncated=Counter(
                "guardrail_otel_evaluations_truncated_total",
                "Word evaluations left out of a verdict span beyond otel_max_words_per_span",
                registry=r,
            ),
            image_decoder_crashes=Counter(
                "guardrail_image_decoder_crashes_total",
                "Image decoder processes lost to the image they decoded (it crashed or hung "
                "them; the image got a 422 and the process was replaced)",
                registry=r,
            ),
            worker_restarts=Counter(
                "guardrail_worker_restarts_total",
                "Supervised child processes restarted after they died, by kind",
                ["kind"],
                registry=r,
            ),
            proxy_requests=Counter(
                "guardrail_proxy_requests_total",
                "Requests forwarded by the proxy, by route and status class (2xx..5xx; the "
                "proxy's own 502/504 included)",
                ["route", "code"],
                registry=r,
            ),
            proxy_duration=Histogram(
                "guardrail_proxy_request_duration_seconds",
                "From sending a request upstream to the end of its answer (a stream: its last "
                "chunk relayed, so its whole length)",
                ["route", "model"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            proxy_time_to_first_byte=Histogram(
                "guardrail_proxy_time_to_first_byte_seconds",
                "From sending a request upstream to the first byte of its answer's body",
                ["route", "model"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            proxy_fail_open_drops=Counter(
                "guardrail_proxy_fail_open_drops_total",
                "Proxied responses that could not be teed to ingest (traffic still flowed)",
                ["reason"],
                registry=r,
            ),
            proxy_not_applicable=Counter(
                "guardrail_proxy_not_applicable_total",
                "Proxied chat answers the audit does not apply to, by reason (text_only, "
                "multi_image, too_many_images, image_url_not_allowed, no_text): not failures",
                ["reason"],
                registry=r,
            ),
            image_fetches=Counter(
                "guardrail_image_fetches_total",
                "Image URLs the audit path was asked to fetch, by outcome",
                ["outcome"],
                registry=r,
            ),
            proxy_tee_pending=Gauge(
                "guardrail_proxy_tee_pending",
                "Proxied exchanges waiting to be handed to ingest (bounded: proxy_max_pending)",
                registry=r,
            ),
            proxy_tee_pending_bytes=Gauge(
                "guardrail_proxy_tee_pending_bytes",
                "Bytes held by proxied exchanges waiting for ingest (proxy_max_pending_bytes)",
                registry=r,
            ),
            alert_deliveries=Counter(
                "guardrail_alert_deliveries_total",
                "Webhook delivery attempts of spike notifications, by outcome (delivered, "
                "retry; given up: rejected, exhausted, expired)",
                ["outcome"],
                registry=r,
            ),
            backlog=BacklogCollector(registry=r),
        )


@dataclass(frozen=True, slots=True)
class Backlog:
    """The audit queue as the database sees it."""

    queued: int
    running: int
    oldest_age_seconds: float
    live_workers: int
    alerts_pending: int = 0  # notifications in the alert outbox, not delivered nor given up
    alerts_oldest_age_seconds: float = 0.0
    spikes: tuple[tuple[str, bool], ...] = ()  # (model, spike alert firing) per configured model


class BacklogCollector(Collector):
    """`guardrail_queue_depth`, `_running`, `_oldest_job_age_seconds`, `guardrail_workers_live`,
    the alert outbox (`guardrail_alert_outbox_pending`, `_oldest_age_seconds`), the spike state
    (`guardrail_hallucination_spike{model}`) and `guardrail_database_up`, read from the database
    at scrape time (cached for `cache_seconds`, so that several scrapers cost one query).
    Exports nothing until a reader is set (`serve` sets one; workers never do, so the global
    depth is never double-counted by a worker)."""

    def __init__(self, registry: CollectorRegistry | None = None, cache_seconds: float = 2.0):
        self.reader: Callable[[], Backlog] | None = None
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, Backlog | None] | None = None
        if registry is not None:
            registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return list(self._families(Backlog(0, 0, 0.0, 0), up=True))

    def collect(self) -> Iterable[Metric]:
        if self.reader is None:
            return []
        with self._lock:  # one query at a time, whatever the number of scrapers
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.cache_seconds:
                try:
                    value: Backlog | None = self.reader()
                except Exception:  # the database is down: say so, invent no depth
                    value = None
                self._cached = (now, value)
            backlog = self._cached[1]
        if backlog is None:
            return [GaugeMetricFamily("guardrail_database_up", _DB_UP_HELP, value=0)]
        return list(self._families(backlog, up=True))

    @staticmethod
    def _families(b: Backlog, *, up: bool) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "guardrail_queue_depth", "Audit jobs waiting in the queue", value=b.queued
        )
        yield GaugeMetricFamily(
            "guardrail_queue_running", "Audit jobs being worked on", value=b.running
        )
        yield GaugeMetricFamily(
            "guardrail_queue_oldest_job_age_seconds",
            "Age of the oldest waiting audit job",
            value=b.oldest_age_seconds,
        )
        yield GaugeMetricFamily(
            "guardrail_workers_live",
            "Audit workers with a recent heartbeat in the database",
            value=b.live_workers,
        )
        yield GaugeMetricFamily(
            "guardrail_alert_outbox_pending",
            "Spike notifications waiting for webhook delivery (not delivered, not given up)",
            value=b.alerts_pending,
        )
        yield GaugeMetricFamily(
            "guardrail_alert_outbox_oldest_age_seconds",
            "Age of the oldest spike notification waiting for webhook delivery",
            value=b.alerts_oldest_age_seconds,
        )
        spike = GaugeMetricFamily(
            "guardrail_hallucination_spike",
            "1 while the guardrail's spike check has a firing alert for the model, else 0",
            labels=["model"],
        )
        for model, firing in b.spikes:
            spike.add_metric([model], 1 if firing else 0)
        yield spike
        yield GaugeMetricFamily("guardrail_database_up", _DB_UP_HELP, value=1 if up else 0)


_DB_UP_HELP = "Whether the last scrape-time read of the database succeeded"

# A snapshot: family name -> (type, help, {(sample name, sorted labels): value})
Snapshot = dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """The counters and histograms of `registry` as plain data (picklable, for a pipe)."""
    out: Snapshot = {}
    for family in registry.collect():
        if family.type not in ("counter", "histogram"):
            continue
        values = {
            (s.name, tuple(sorted(s.labels.items()))): float(s.value)
            for s in family.samples
            if not s.name.endswith("_created")
        }
        if values:
            out[family.name] = (family.type, family.documentation, values)
    return out


class ChildSnapshots:
    """The latest snapshot of every live child process, plus the totals of children that died
    (so that a restart never makes a counter go back)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, Snapshot] = {}
        self._retired: Snapshot = {}

    def update(self, child: str, values: Snapshot) -> None:
        with self._lock:
            self._live[child] = values

    def retire(self, child: str) -> None:
        with self._lock:
            _add(self._retired, self._live.pop(child, {}))

    def total(self) -> Snapshot:
        with self._lock:
            out: Snapshot = {}
            _add(out, self._retired)
            for values in self._live.values():
                _add(out, values)
            return out


def _add(into: Snapshot, values: Snapshot) -> None:
    for name, (kind, doc, samples) in values.items():
        target = into.setdefault(name, (kind, doc, {}))[2]
        for key, value in samples.items():
            target[key] = target.get(key, 0.0) + value


class _Merged(Collector):
    """A registry's families with the children's values added sample by sample."""

    def __init__(self, registry: CollectorRegistry, children: ChildSnapshots) -> None:
        self.registry = registry
        self.children = children

    def collect(self) -> Iterable[Metric]:
        extra = self.children.total()
        for family in self.registry.collect():
            merged: Any = extra.pop(family.name, None)
            if merged is None:
                yield family
                continue
            child_values = dict(merged[2])
            out = Metric(family.name, family.documentation, family.type)
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                out.add_sample(s.name, s.labels, s.value + child_values.pop(key, 0.0))
            for (name, labels), value in child_values.items():
                out.add_sample(name, dict(labels), value)
            yield out
        for name, (kind, doc, samples) in extra.items():  # a family this process lacks
            out = Metric(name, doc, kind)
            for (sample, labels), value in samples.items():
                out.add_sample(sample, dict(labels), value)
            yield out
