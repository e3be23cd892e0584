"""OpenTelemetry export of verdicts, so that they show next to the request in the traces a team
already keeps (Arize Phoenix, Langfuse, Jaeger, an OpenTelemetry Collector...).

For each audited sample, one span `guardrail.audit` whose parent is the client's request, taken
from the W3C `traceparent` the proxy stored with the sample (without one: the root of a new
trace, findable by `gen_ai.response.id` and `guardrail.request.id`), carrying one
`gen_ai.evaluation.result` event per audited word (OpenTelemetry GenAI semantic conventions:
`gen_ai.evaluation.name`, `.score.value`, `.score.label`, `.explanation`, `gen_ai.response.id`),
and OpenInference's `openinference.span.kind = EVALUATOR` with the verdicts as `output.value`
(Phoenix shows both in its trace view; Langfuse reads `output.value` and its own
`langfuse.observation.type = evaluator`).

Spans leave over OTLP/HTTP (protobuf) from a bounded batch queue in the audit worker's process,
after the audit is committed (`guardrail.service.otel.exporter`).  The OpenTelemetry SDK is
the optional extra `otel`: this package's top level never imports it, so the base install
runs without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detectors.types import AuditedWord, Verdict
    from guardrail.config import Settings
    from guardrail.service.metrics import Metrics
    from guardrail.service.otel.exporter import VerdictExporter

__all__ = [
    "EVALUATION_EVENT",
    "EVALUATION_NAME",
    "OTEL_EXTRA_MISSING",
    "SPAN_NAME",
    "SPAN_OUTCOMES",
    "AuditTrace",
    "WordEvaluation",
    "audit_trace",
    "build_exporter",
    "otel_installed",
    "traces_url",
    "word_evaluations",
]

SPAN_NAME = "guardrail.audit"
EVALUATION_EVENT = "gen_ai.evaluation.result"
EVALUATION_NAME = "hallucination"
# exported: the receiver took it; failed: refused or unreachable after the exporter's retries;
# queue_full: the export queue was full; stopped: still queued when the worker stopped, or
# audited after the export was shut down; error: the span could not be built (a bug, logged)
SPAN_OUTCOMES = ("exported", "failed", "queue_full", "stopped", "error")
OTEL_EXTRA_MISSING = (
    "otel_endpoint is set but the OpenTelemetry exporter is not installed: install the `otel` "
    "extra (pip install 'eagle-guardrail[otel]') or unset otel_endpoint"
)


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditTrace:
    """What ties an audited sample to the client's request.

    Attributes:
        sample_id: the guardrail's sample id.
        model: the audited model's configured name.
        request_id: the client's `X-Request-Id` (or the samples API's `request_id`).
        traceparent: the client's W3C `traceparent` header as stored (an invalid value starts
            a new trace).
        response_id: the upstream's response id (`chatcmpl-...`).
        choice_index: which choice of an `n > 1` answer the sample is.
    """

    sample_id: str
    model: str
    request_id: str | None = None
    traceparent: str | None = None
    response_id: str | None = None
    choice_index: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class WordEvaluation:
    """One audited word's verdict, as exported (`hallucination_score` in [0, 1])."""

    word: str
    position: int
    category: str
    label: str
    hallucination_score: float
    reason: str
    detector: str
    detector_version: str


def audit_trace(sample: Any) -> AuditTrace:
    """The correlation keys of a `storage.models.Sample` (stored by the proxy and the ingest
    API)."""
    choice = sample.choice_index
    return AuditTrace(
        sample_id=str(sample.id),
        model=str(sample.model),
        request_id=sample.request_id,
        traceparent=sample.traceparent,
        response_id=sample.response_id,
        choice_index=int(choice) if choice is not None else None,
    )


def word_evaluations(
    words: Iterable[AuditedWord], verdicts: Iterable[Verdict]
) -> tuple[WordEvaluation, ...]:
    """Pair an audit's words with their verdicts."""
    return tuple(
        WordEvaluation(
            word=word.word,
            position=word.position,
            category=word.category,
            label=verdict.label.value,
            hallucination_score=float(verdict.hallucination_score),
            reason=verdict.reason,
            detector=verdict.detector,
            detector_version=verdict.version,
        )
        for word, verdict in zip(words, verdicts, strict=True)
    )


def otel_installed() -> bool:
    """Whether the `otel` extra (OpenTelemetry SDK and OTLP/HTTP exporter) can be imported."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for `endpoint`: a base URL as in `OTEL_EXPORTER_OTLP_ENDPOINT`
    gets `/v1/traces` appended; a URL that already ends in `/v1/traces` is used as it is."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1/traces") else f"{base}/v1/traces"


def build_exporter(settings: Settings, metrics: Metrics) -> VerdictExporter | None:
    """The exporter `settings` ask for, or None when `otel_endpoint` is unset.

    Raises:
        ImportError: the `otel` extra is not installed (the message names it).
    """
    if not settings.otel_endpoint:
        return None
    if not otel_installed():
        raise ImportError(OTEL_EXTRA_MISSING)
    from guardrail.service.otel.exporter import build

    return build(settings, metrics)
