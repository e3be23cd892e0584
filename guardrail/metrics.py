"""Every Prometheus metric of the guardrail, defined here and nowhere else.

Names follow Prometheus conventions: `guardrail_` prefix, base units (seconds), counters end in
`_total`. Labels are bounded: `model` comes from the configuration, `verdict` from the four
labels, `category` from the fixed object vocabulary plus `other` (never the raw word), `reason`
from fixed lists. Histograms are classic histograms with explicit buckets.

Multi-process deployments: each process serves its own registry (`guardrail serve` runs the
API and its worker threads in one process; each `guardrail worker` process serves its own
`/metrics` on `--metrics-port`), and Prometheus sums over the targets. No shared
multiprocess directory is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from detectors.objects import COCO_CATEGORIES, DEFAULT_VOCABULARY

__all__ = ["CATEGORIES", "SKIP_REASONS", "Metrics", "category_label"]

CATEGORIES: frozenset[str] = frozenset({*COCO_CATEGORIES, *DEFAULT_VOCABULARY.forms.values()})
SKIP_REASONS = ("rate", "rate_limited", "no_image", "unknown_model", "ingest_error")
AUDIT_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
PASSES_BUCKETS = (10, 25, 50, 100, 200, 400, 800, 1600, 3200, 6400)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


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
    queue_depth: Gauge
    queue_running: Gauge
    queue_oldest_age: Gauge
    proxy_upstream_latency: Histogram
    proxy_fail_open_drops: Counter

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
            queue_depth=Gauge(
                "guardrail_queue_depth", "Audit jobs waiting in the queue", registry=r
            ),
            queue_running=Gauge(
                "guardrail_queue_running", "Audit jobs being worked on", registry=r
            ),
            queue_oldest_age=Gauge(
                "guardrail_queue_oldest_job_age_seconds",
                "Age of the oldest waiting audit job",
                registry=r,
            ),
            proxy_upstream_latency=Histogram(
                "guardrail_proxy_upstream_latency_seconds",
                "Latency of the upstream model behind the proxy",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            proxy_fail_open_drops=Counter(
                "guardrail_proxy_fail_open_drops_total",
                "Proxied responses that could not be teed to ingest (traffic still flowed)",
                ["reason"],
                registry=r,
            ),
        )
