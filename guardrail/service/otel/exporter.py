"""`VerdictExporter`: audited samples as spans, through a bounded OTLP/HTTP batch queue.

Imports the OpenTelemetry SDK (the `otel` extra): reached only through
`guardrail.service.otel.build_exporter`, which says which extra to install when it is missing.  The
provider is this module's own, never the global one: the guardrail does not trace itself here,
and a host application's tracing is left alone.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    ReadableSpan,
    Span,
    SpanLimits,
    SpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from detectors.types import VerdictLabel
from guardrail import __version__
from guardrail.service.otel import (
    EVALUATION_EVENT,
    EVALUATION_NAME,
    SPAN_NAME,
    SPAN_OUTCOMES,
    AuditTrace,
    WordEvaluation,
    traces_url,
)

if TYPE_CHECKING:
    from guardrail.config import Settings
    from guardrail.service.metrics import Metrics

__all__ = ["VerdictExporter", "build"]

log = logging.getLogger("guardrail.otel")

_FLAGGED = frozenset(label.value for label in VerdictLabel.hallucinated())
_PROPAGATOR = TraceContextTextMapPropagator()


class VerdictExporter:
    """Turns audited samples into spans and hands them to a bounded OTLP/HTTP batch queue.

    Call `export` after each committed audit (it never raises) and `shutdown` once, when the
    worker stops (it flushes within `flush_seconds`).
    """

    def __init__(
        self,
        provider: TracerProvider,
        metrics: Metrics,
        pending: _Pending,
        *,
        max_words: int,
        flush_seconds: float,
    ) -> None:
        self._provider = provider
        self._tracer: Tracer = provider.get_tracer("eagle-guardrail", __version__)
        self._metrics = metrics
        self._pending = pending
        self._stopped = False
        self.max_words = max_words
        self.flush_seconds = flush_seconds
        for outcome in SPAN_OUTCOMES:  # at 0 from the start, so increase() sees the first
            metrics.otel_spans.labels(outcome=outcome)

    def export(
        self,
        trace: AuditTrace,
        words: Sequence[WordEvaluation],
        *,
        forward_passes: int | None = None,
        start_time_ns: int | None = None,
        end_time_ns: int | None = None,
    ) -> None:
        """Queue the span of one audited sample; never raises (a failure is counted)."""
        if self._stopped:
            self._metrics.otel_spans.labels(outcome="stopped").inc()
            return
        try:
            self._export(trace, words, forward_passes, start_time_ns, end_time_ns)
        except Exception:
            log.exception("sample %s: could not build its OpenTelemetry span", trace.sample_id)
            self._metrics.otel_spans.labels(outcome="error").inc()

    def _export(
        self,
        trace: AuditTrace,
        words: Sequence[WordEvaluation],
        forward_passes: int | None,
        start_time_ns: int | None,
        end_time_ns: int | None,
    ) -> None:
        kept = list(words[: self.max_words])
        left_out = len(words) - len(kept)
        if left_out:
            self._metrics.otel_evaluations_truncated.inc(left_out)
        attributes: dict[str, Any] = {
            "openinference.span.kind": "EVALUATOR",
            "langfuse.observation.type": "evaluator",  # Langfuse's name for the same kind
            "guardrail.sample.id": trace.sample_id,
            "guardrail.model": trace.model,
            "guardrail.words.audited": len(words),
            "guardrail.words.flagged": sum(w.label in _FLAGGED for w in words),
            "output.value": json.dumps(
                [
                    {
                        "word": w.word,
                        "position": w.position,
                        "label": w.label,
                        "score": round(w.hallucination_score, 6),
                    }
                    for w in kept
                ],
                ensure_ascii=False,
            ),
            "output.mime_type": "application/json",
        }
        optional = {
            "gen_ai.response.id": trace.response_id,
            "guardrail.request.id": trace.request_id,
            "guardrail.choice.index": trace.choice_index,
            "guardrail.forward_passes": forward_passes,
            "guardrail.words.truncated": left_out or None,
        }
        attributes.update({k: v for k, v in optional.items() if v is not None})
        span = self._tracer.start_span(
            SPAN_NAME,
            context=_parent(trace.traceparent),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=start_time_ns,
        )
        for w in kept:
            event: dict[str, Any] = {
                "gen_ai.evaluation.name": EVALUATION_NAME,
                "gen_ai.evaluation.score.value": w.hallucination_score,
                "gen_ai.evaluation.score.label": w.label,
                "gen_ai.evaluation.explanation": w.reason,
                "guardrail.word": w.word,
                "guardrail.token.position": w.position,
                "guardrail.word.category": w.category,
                "guardrail.detector": w.detector,
                "guardrail.detector.version": w.detector_version,
            }
            if trace.response_id is not None:
                event["gen_ai.response.id"] = trace.response_id
            span.add_event(EVALUATION_EVENT, attributes=event, timestamp=end_time_ns)
        span.end(end_time=end_time_ns)

    def flush(self, timeout_seconds: float | None = None) -> bool:
        """Export what is queued now; False when that did not finish within the timeout."""
        seconds = self.flush_seconds if timeout_seconds is None else timeout_seconds
        return _within(self._provider.force_flush, seconds)

    def shutdown(self) -> None:
        """Flush what is queued (within `flush_seconds`) and stop; spans still queued then are
        counted as `stopped`."""
        if self._stopped:
            return
        self._stopped = True
        _within(self._provider.shutdown, self.flush_seconds)
        left = self._pending.drain()
        if left:
            log.warning("%d OpenTelemetry spans were not exported before the stop", left)
            self._metrics.otel_spans.labels(outcome="stopped").inc(left)


def _within(call: Callable[[], object], seconds: float) -> bool:
    """Run `call` in a daemon thread and wait at most `seconds`: the SDK's flush and shutdown
    honour no timeout of their own, and an unreachable receiver must not hold a stopping
    worker."""
    done = threading.Event()

    def run() -> None:
        try:
            call()
        except Exception:
            log.exception("OpenTelemetry flush failed")
        finally:
            done.set()

    threading.Thread(target=run, name="otel-flush", daemon=True).start()
    return done.wait(seconds)


def _parent(traceparent: str | None) -> Context:
    """The client's span as a remote parent, or an empty context (the root of a new trace);
    the W3C propagator ignores a malformed value."""
    if not traceparent:
        return Context()
    return _PROPAGATOR.extract({"traceparent": traceparent}, Context())


class _Pending:
    """Spans ended but not yet handed to the exporter, against the queue's bound.  The batch
    processor drops a span with only a log line when its queue is full, so spans over the bound
    are refused here, counted, before they reach it."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._count = 0
        self._lock = threading.Lock()

    def admit(self) -> bool:
        with self._lock:
            if self._count >= self.bound:
                return False
            self._count += 1
            return True

    def taken(self, n: int) -> None:
        with self._lock:
            self._count = max(0, self._count - n)

    def drain(self) -> int:
        with self._lock:
            left, self._count = self._count, 0
            return left


class _CountingExporter(SpanExporter):
    """The OTLP exporter, its results counted in `guardrail_otel_spans_total`."""

    def __init__(self, inner: SpanExporter, metrics: Metrics, pending: _Pending) -> None:
        self.inner = inner
        self.metrics = metrics
        self.pending = pending

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.pending.taken(len(spans))
        try:
            result = self.inner.export(spans)
        except Exception:
            log.exception("OpenTelemetry export of %d spans raised", len(spans))
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.metrics.otel_spans.labels(outcome="exported").inc(len(spans))
        else:
            log.warning("OpenTelemetry export of %d spans failed", len(spans))
            self.metrics.otel_spans.labels(outcome="failed").inc(len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _BoundedProcessor(SpanProcessor):
    """The batch processor behind the `_Pending` bound."""

    def __init__(self, inner: SpanProcessor, metrics: Metrics, pending: _Pending) -> None:
        self.inner = inner
        self.metrics = metrics
        self.pending = pending

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if not self.pending.admit():
            self.metrics.otel_spans.labels(outcome="queue_full").inc()
            return
        self.inner.on_end(span)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def build(settings: Settings, metrics: Metrics) -> VerdictExporter:
    """The exporter for `settings` (`otel_endpoint` set); see
    `guardrail.service.otel.build_exporter`."""
    assert settings.otel_endpoint is not None  # build_exporter checked it
    resource = Resource(
        {
            **settings.otel_resource_attributes,
            "service.name": settings.otel_service_name,
            "service.version": __version__,
        }
    )
    # verdicts were sampled by the guardrail already: export every one, whatever the client's
    # sampled flag (ALWAYS_ON, not the default ParentBased, which would drop them)
    provider = TracerProvider(
        resource=resource,
        sampler=ALWAYS_ON,
        span_limits=SpanLimits(
            max_events=settings.otel_max_words_per_span,
            max_span_attributes=64,
            max_event_attributes=32,
            max_attribute_length=64 * 1024,
        ),
    )
    pending = _Pending(settings.otel_max_queue_spans)
    otlp = OTLPSpanExporter(
        endpoint=traces_url(settings.otel_endpoint),
        headers={k: v.get_secret_value() for k, v in settings.otel_headers.items()},
        timeout=settings.otel_timeout_seconds,
    )
    batch = BatchSpanProcessor(
        _CountingExporter(otlp, metrics, pending),
        max_queue_size=settings.otel_max_queue_spans,
        max_export_batch_size=min(settings.otel_max_batch_spans, settings.otel_max_queue_spans),
        schedule_delay_millis=settings.otel_schedule_delay_seconds * 1000,
        export_timeout_millis=settings.otel_timeout_seconds * 1000,
    )
    provider.add_span_processor(_BoundedProcessor(batch, metrics, pending))
    return VerdictExporter(
        provider,
        metrics,
        pending,
        max_words=settings.otel_max_words_per_span,
        flush_seconds=settings.otel_timeout_seconds,
    )
