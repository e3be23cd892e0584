"""Audit workers: claim a job, audit its sample, store the result, complete the job.

The result and the job's completion are committed in one transaction, and only if this worker
still holds the job's lease (a heartbeat extends it while the audit runs), so a job is audited
to completion exactly once even when a worker is killed mid-audit: its lease expires and
another worker takes the job.  Every claim counts an attempt: a job whose workers keep dying
fails with reason `worker_crashed` once its attempts are spent (checked before every claim, so
without the scheduler too).  Each worker records a heartbeat row while it runs (live workers are
counted from them) and, when stopped, releases its job instead of abandoning it
(`release_current`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from guardrail.errors import MissingImageError, UnknownModelError, is_permanent
from guardrail.logs import log_context
from guardrail.service.auditor import ModelAuditor
from guardrail.service.canonical import decode_canvas, decode_for_audit
from guardrail.service.metrics import Metrics, category_label
from guardrail.service.otel import AuditTrace, audit_trace, word_evaluations
from storage import queue
from storage.models import Sample, SampleStatus, utcnow
from storage.repositories import save_audit

if TYPE_CHECKING:
    from guardrail.service.otel.exporter import VerdictExporter

__all__ = ["Worker"]

log = logging.getLogger("guardrail.worker")


class Worker:
    """One worker: `run_once` audits at most one job; `run` loops until `stop` is set."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        auditors: Mapping[str, ModelAuditor],
        metrics: Metrics,
        *,
        lease_seconds: float = 120.0,
        poll_seconds: float = 0.5,
        owner: str | None = None,
        heartbeat_seconds: float = 5.0,
        clock: Callable[[], datetime] = utcnow,
        exporter: VerdictExporter | None = None,
        wait: Callable[[threading.Event, float], bool] = threading.Event.wait,
    ) -> None:
        self.sessions = sessions
        self.auditors = auditors
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.clock = clock  # the queue's notion of now (tests pass a fake one)
        self.exporter = exporter  # verdicts as OpenTelemetry spans, after each commit
        # how the lease's heartbeat waits out its interval: True once the audit is over (tests
        # step it with their clock instead of sleeping)
        self.wait = wait
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stop = threading.Event()
        self.current_job: int | None = None
        self.jobs_done = 0  # audits completed, failed or released by this worker
        self._remote_seen: dict[str, Any] = {}  # model -> RemoteStats already counted

    def run(self) -> None:
        """Audit jobs until `stop` is set, recording a heartbeat row meanwhile."""
        alive = threading.Thread(target=self._alive, name=f"alive-{self.owner}", daemon=True)
        alive.start()
        try:
            while not self.stop.is_set():
                try:
                    worked = self.run_once()
                except Exception:  # the database went away, say: log, wait, retry
                    log.exception("worker %s: queue error", self.owner)
                    worked = False
                if not worked:
                    self.stop.wait(self.poll_seconds)
        finally:
            self.stop.set()
            alive.join(timeout=5)
            try:
                with self.sessions.begin() as session:
                    queue.forget_worker(session, self.owner)
            except Exception:  # its heartbeat will simply go stale
                log.warning("worker %s: could not remove its heartbeat row", self.owner)

    def release_current(self) -> bool:
        """Give the job being audited back to the queue without counting the attempt (a clean
        stop that cannot wait for the audit); its late result will be refused."""
        job_id = self.current_job
        if job_id is None:
            return False
        with self.sessions.begin() as session:
            released = queue.release(session, job_id, self.owner, now=self.clock())
        if released:
            log.info("worker %s: released job %s", self.owner, job_id)
        return released

    def _alive(self) -> None:
        while True:
            try:
                with self.sessions.begin() as session:
                    queue.beat(
                        session,
                        self.owner,
                        hostname=socket.gethostname(),
                        pid=os.getpid(),
                        job_id=self.current_job,
                        now=self.clock(),
                    )
            except Exception:
                log.warning("worker %s: could not record its heartbeat", self.owner)
            if self.stop.wait(self.heartbeat_seconds):
                return

    def run_once(self) -> bool:
        """Claim and audit one job; False when the queue had none."""
        with self.sessions.begin() as session:
            now = self.clock()
            for failed in queue.fail_abandoned(session, now):
                log.warning(
                    "worker %s: job %s (sample %s) failed: its worker died on each of %d attempts",
                    self.owner,
                    failed.job_id,
                    failed.sample_id,
                    failed.attempts,
                )
                self.metrics.jobs_failed.labels(
                    model=failed.model, reason=queue.FailureReason.WORKER_CRASHED
                ).inc()
            job = queue.claim(session, self.owner, lease_seconds=self.lease_seconds, now=now)
            if job is None:
                return False
            job_id, sample_id = job.id, job.sample_id
            # the heartbeat row says which job this worker holds from the claim on
            queue.beat(
                session,
                self.owner,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                job_id=job_id,
                now=now,
            )
            image_data, prompt = job.image_data, job.prompt or ""
            sample = session.get(Sample, sample_id)
            assert sample is not None  # the foreign key guarantees it
            model, text, token_ids = sample.model, sample.generated_text, list(sample.token_ids)
            layout = sample.image_layout
            request_id = sample.request_id
            trace = audit_trace(sample)
            sample.status = SampleStatus.AUDITING
        self.current_job = job_id
        try:
            # every log line of this audit names its sample (and the client's request id)
            with log_context(request_id=request_id, sample_id=sample_id):
                log.info("worker %s: auditing job %s (model %s)", self.owner, job_id, model)
                return self._audit(
                    job_id, sample_id, model, text, token_ids, image_data, prompt, trace, layout
                )
        finally:
            self._count_remote(model)
            self.current_job = None
            self.jobs_done += 1

    def _count_remote(self, model: str) -> None:
        """Requests a remote model's client sent since the last job (failed audits included)."""
        auditor = self.auditors.get(model)
        stats = auditor.remote_stats() if auditor is not None else None
        if stats is None:
            return
        seen = self._remote_seen.get(model)
        delta = stats.minus(seen) if seen is not None else stats
        self._remote_seen[model] = stats
        self.metrics.remote_requests.labels(model=model).inc(delta.requests)
        self.metrics.remote_request_failures.labels(model=model).inc(delta.failures)
        self.metrics.remote_request_seconds.labels(model=model).inc(delta.seconds)

    def _audit(
        self,
        job_id: int,
        sample_id: str,
        model: str,
        text: str,
        token_ids: list[int],
        image_data: bytes | None,
        prompt: str,
        trace: AuditTrace,
        layout: dict[str, Any] | None = None,
    ) -> bool:
        started_ns = time.time_ns()
        heartbeat = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job_id, heartbeat), daemon=True)
        beat.start()
        try:
            auditor = self.auditors.get(model)
            if auditor is None:
                raise UnknownModelError(f"model {model!r} is not configured on this worker")
            if image_data is None:
                raise MissingImageError("the job carries no image")
            if layout:  # a canvas of several images: decoded as stored (ingest bounded it)
                image, image_layout = decode_canvas(image_data, layout)
                result = auditor.audit(image, prompt, token_ids or None, text, image_layout)
            else:
                # canonical since ingest made it so; older jobs are downscaled while decoding
                image = decode_for_audit(image_data, auditor.settings)
                result = auditor.audit(image, prompt, token_ids or None, text)
        except Exception as exc:
            heartbeat.set()
            beat.join()
            self._failed(job_id, sample_id, model, exc)
            return True
        heartbeat.set()
        beat.join()
        with self.sessions() as session, session.begin():
            if not queue.complete(session, job_id, self.owner, now=self.clock()):
                session.rollback()  # the lease was lost: another worker owns this job now
                log.warning("worker %s: lost the lease of job %s", self.owner, job_id)
                return True
            sample = session.get(Sample, sample_id)
            assert sample is not None
            save_audit(
                session,
                sample,
                words=result.words,
                attributions=result.attributions,
                verdicts=result.verdicts,
                token_ids=result.token_ids,
                thresholds_id=result.thresholds_id,
            )
        if result.remote is not None:
            log.info(
                "worker %s: job %s: %d requests to %s (%d retried, %d failed) in %.2f s",
                self.owner,
                job_id,
                result.remote.requests,
                result.attributions[0].scorer_name if result.attributions else model,
                result.remote.retries,
                result.remote.failures,
                result.remote.seconds,
            )
        log.info(
            "worker %s: job %s audited: %d words, %d forward passes, %.2f s",
            self.owner,
            job_id,
            len(result.verdicts),
            result.forward_passes,
            result.seconds,
        )
        m = self.metrics
        m.audits.labels(model=model).inc()
        m.audit_duration.labels(model=model).observe(result.seconds)
        m.audit_forward_passes.labels(model=model).observe(result.forward_passes)
        if result.budget_exhausted:
            m.budget_exhaustions.labels(model=model).inc(result.budget_exhausted)
        for word, verdict in zip(result.words, result.verdicts, strict=True):
            m.tokens_audited.labels(
                model=model, verdict=verdict.label.value, category=category_label(word.category)
            ).inc()
        if self.exporter is not None:  # after the commit: never fails or delays the audit
            self.exporter.export(
                trace,
                word_evaluations(result.words, result.verdicts),
                forward_passes=result.forward_passes,
                start_time_ns=started_ns,
                end_time_ns=started_ns + int(result.seconds * 1e9),
            )
        return True

    def _failed(self, job_id: int, sample_id: str, model: str, exc: Exception) -> None:
        """Record a failed attempt: back to the queue after its backoff, or failed for good
        (bad input at once, by the error's type; any error once the attempts are spent)."""
        self.metrics.audit_failures.labels(model=model).inc()
        message = f"{type(exc).__name__}: {exc}"
        log.warning("worker %s: job %s failed: %s", self.owner, job_id, message)
        log.debug("%s", traceback.format_exc())
        permanent = is_permanent(exc)  # by type: guardrail.errors
        with self.sessions.begin() as session:
            status = queue.fail(
                session, job_id, self.owner, message, permanent=permanent, now=self.clock()
            )
            if status is not None and status.value == "failed":
                failed = session.get(Sample, sample_id)
                if failed is not None:
                    failed.status = SampleStatus.FAILED
        if status is not None and status.value == "failed":
            reasons = queue.FailureReason
            reason = reasons.INVALID_INPUT if permanent else reasons.ERROR
            self.metrics.jobs_failed.labels(model=model, reason=reason).inc()

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        interval = max(0.5, self.lease_seconds / 3)
        while not self.wait(done, interval):
            try:
                with self.sessions.begin() as session:
                    if not queue.extend(
                        session,
                        job_id,
                        self.owner,
                        lease_seconds=self.lease_seconds,
                        now=self.clock(),
                    ):
                        return
            except Exception:
                log.exception("worker %s: could not extend the lease of job %s", self.owner, job_id)
