"""The tables: samples, flagged tokens, attributions, verdicts, jobs (SQLAlchemy 2, typed).

Raw images and prompts are columns that stay NULL unless the operator opts in (`store_raw`);
the image's SHA-256 and size are always kept, and so is the region label map (compressed), so
a report can draw a heatmap over a neutral canvas of the same regions without the image.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Alert",
    "AlertNotification",
    "AttributionRecord",
    "Base",
    "FlaggedToken",
    "Job",
    "JobStatus",
    "Report",
    "Sample",
    "SampleStatus",
    "VerdictRecord",
    "WorkerRecord",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class SampleStatus(str, enum.Enum):
    QUEUED = "queued"
    AUDITING = "auditing"
    AUDITED = "audited"
    FAILED = "failed"


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Sample(Base):
    """One sampled model output (image, prompt, generated tokens)."""

    __tablename__ = "samples"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    model: Mapped[str] = mapped_column(String(128), index=True)
    request_id: Mapped[str | None] = mapped_column(String(128), index=True)
    # correlation with the request's other records: the upstream's answer id (chatcmpl-...),
    # the W3C traceparent the client sent, and which choice of the answer this is
    response_id: Mapped[str | None] = mapped_column(String(128), index=True)
    traceparent: Mapped[str | None] = mapped_column(String(55), index=True)
    choice_index: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[SampleStatus] = mapped_column(
        Enum(SampleStatus, native_enum=False, length=16), default=SampleStatus.QUEUED
    )
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_width: Mapped[int] = mapped_column(Integer)
    image_height: Mapped[int] = mapped_column(Integer)
    # several images laid out on one canvas (`detectors.layout.ImageLayout.as_dict`): the
    # stored image is the canvas; None for one image
    image_layout: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    generated_text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list[Any]] = mapped_column(JSON)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # only with store_raw
    prompt: Mapped[str | None] = mapped_column(Text)
    image_data: Mapped[bytes | None] = mapped_column(LargeBinary)  # the upload, as sent

    tokens: Mapped[list[FlaggedToken]] = relationship(
        back_populates="sample", cascade="all, delete-orphan", order_by="FlaggedToken.position"
    )

    __table_args__ = (Index("ix_samples_model_received", "model", "received_at"),)


class FlaggedToken(Base):
    """An object word of a sample's output, at its token position."""

    __tablename__ = "flagged_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sample_id: Mapped[str] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    token_id: Mapped[int] = mapped_column(Integer)
    word: Mapped[str] = mapped_column(String(64))
    category: Mapped[str] = mapped_column(String(64))

    sample: Mapped[Sample] = relationship(back_populates="tokens")
    attribution: Mapped[AttributionRecord | None] = relationship(
        back_populates="token", cascade="all, delete-orphan", uselist=False
    )
    verdict: Mapped[VerdictRecord | None] = relationship(
        back_populates="token", cascade="all, delete-orphan", uselist=False
    )


class AttributionRecord(Base):
    """The search's result for one token: ordering, curves and provenance."""

    __tablename__ = "attributions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_pk: Mapped[int] = mapped_column(
        ForeignKey("flagged_tokens.id", ondelete="CASCADE"), unique=True
    )
    order: Mapped[list[Any]] = mapped_column(JSON)
    insertion: Mapped[list[Any]] = mapped_column(JSON)
    deletion: Mapped[list[Any]] = mapped_column(JSON)
    compact_set: Mapped[list[Any]] = mapped_column(JSON)
    p_full: Mapped[float] = mapped_column(Float)
    p_blank: Mapped[float] = mapped_column(Float)
    forward_passes: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    stopped_by: Mapped[str] = mapped_column(String(32))
    search: Mapped[str] = mapped_column(String(32))
    scorer_name: Mapped[str] = mapped_column(String(256))
    fill: Mapped[str] = mapped_column(String(16))
    partition_method: Mapped[str] = mapped_column(String(64))
    # provenance (revision 0007; NULL on rows stored before it): the `detectors` version that
    # ran the search and the objective's weights (lambda1 insight, lambda2 necessity)
    search_version: Mapped[str | None] = mapped_column(String(32))
    weight_insight: Mapped[float | None] = mapped_column(Float)
    weight_necessity: Mapped[float | None] = mapped_column(Float)
    labels_npz: Mapped[bytes] = mapped_column(LargeBinary)  # the region label map, compressed
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    token: Mapped[FlaggedToken] = relationship(back_populates="attribution")


class VerdictRecord(Base):
    """The label of one token and the numbers it was decided from."""

    __tablename__ = "verdicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_pk: Mapped[int] = mapped_column(
        ForeignKey("flagged_tokens.id", ondelete="CASCADE"), unique=True
    )
    label: Mapped[str] = mapped_column(String(32), index=True)
    prior_score: Mapped[float] = mapped_column(Float)
    hallucination_score: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(Text)
    numbers: Mapped[dict[str, Any]] = mapped_column(JSON)
    # provenance (revision 0007; NULL on rows stored before it): the rule set and its version,
    # the calibration its thresholds came from (`detectors.calibration.Calibration.id`) and the
    # scorer whose probabilities it judged
    detector: Mapped[str | None] = mapped_column(String(64))
    detector_version: Mapped[str | None] = mapped_column(String(32))
    thresholds_id: Mapped[str | None] = mapped_column(String(64), index=True)
    scorer_name: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    token: Mapped[FlaggedToken] = relationship(back_populates="verdict")


class Job(Base):
    """An audit to run: claimed with a lease, retried with backoff, done exactly once."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sample_id: Mapped[str] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=16), default=JobStatus.QUEUED
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    run_after: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    # why a FAILED job failed: invalid_input, error (attempts spent), worker_crashed
    failure_reason: Mapped[str | None] = mapped_column(String(32))
    # what the audit needs and the sample may not keep (store_raw off): cleared when done
    image_data: Mapped[bytes | None] = mapped_column(LargeBinary)
    prompt: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_jobs_status_run_after", "status", "run_after"),)


class Report(Base):
    """An audit report for one period (idempotent per kind and period)."""

    __tablename__ = "reports"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32))
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    period_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    html: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (
        UniqueConstraint("kind", "period_start", "period_end", name="uq_report_period"),
    )


class Alert(Base):
    """A hallucination-spike alert for one model: firing until resolved; each change is
    notified through the outbox (`AlertNotification`), and `delivered_at`, `delivery_attempts`
    and `delivery_error` say how its firing notification went."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # firing, resolved
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rate: Mapped[float] = mapped_column(Float)
    baseline: Mapped[float] = mapped_column(Float)
    tokens: Mapped[int] = mapped_column(Integer)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivery_attempts: Mapped[int] = mapped_column(Integer, default=0)
    delivery_error: Mapped[str | None] = mapped_column(Text)


class AlertNotification(Base):
    """One webhook notification of an alert's state change (firing or resolved): the outbox.

    Written in the transaction that changes the alert, so no change is ever lost; claimed by a
    deliverer with a lease (like a job), retried with backoff until delivered or given up."""

    __tablename__ = "alert_notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(16))  # firing, resolved
    status: Mapped[str] = mapped_column(String(16), default="pending")  # delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_after: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    # why a failed notification was given up: rejected, exhausted, expired
    failure_reason: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (Index("ix_alert_notifications_status_run_after", "status", "run_after"),)


class WorkerRecord(Base):
    """A live audit worker: its heartbeat says it is alive (live workers are counted from the
    heartbeats, so a deployment whose every worker died is visible)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    job_id: Mapped[int | None] = mapped_column(Integer)  # the job it is auditing, if any
