"""The read side: what the API, the reports, the spike check, health and the demo read, as typed
rows.  Functions take a session and never commit; rows are frozen and hold no ORM objects, so
they stay valid after the session closes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Integer, func, select
from sqlalchemy.orm import Session

from detectors.types import StopReason, VerdictLabel
from storage.models import (
    Alert,
    AttributionRecord,
    FlaggedToken,
    Job,
    Report,
    Sample,
    SampleStatus,
    VerdictRecord,
)
from storage.repositories import label_map

__all__ = [
    "AlertRow",
    "AuditRow",
    "HeatmapSource",
    "JobRow",
    "ReportRow",
    "ReportSample",
    "ReportSummary",
    "ReportWord",
    "WindowCounts",
    "alerts",
    "firing_alert_id",
    "firing_models",
    "hallucinated_categories",
    "heatmap_source",
    "latest_job",
    "list_audits",
    "list_reports",
    "report",
    "report_samples",
    "sample_status_counts",
    "verdict_counts",
    "window_counts",
]

_HALLUCINATED = sorted(label.value for label in VerdictLabel.hallucinated())
_BUDGET_STOPS = (StopReason.FORWARD_BUDGET.value, StopReason.TIME_BUDGET.value)


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditRow:
    """One audited word of `/v1/audits` with its sample's correlation keys."""

    sample_id: str
    model: str
    received_at: datetime
    request_id: str | None
    response_id: str | None
    traceparent: str | None
    choice_index: int | None
    word: str
    category: str
    position: int
    label: VerdictLabel
    hallucination_score: float
    prior_score: float


def list_audits(
    session: Session,
    *,
    model: str | None = None,
    label: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = 100,
) -> list[AuditRow]:
    """Audited words, newest sample first (words in output order), `limit` at most (None: all)."""
    query = (
        select(Sample, FlaggedToken, VerdictRecord)
        .join(FlaggedToken, FlaggedToken.sample_id == Sample.id)
        .join(VerdictRecord, VerdictRecord.token_pk == FlaggedToken.id)
        .order_by(Sample.received_at.desc(), FlaggedToken.position)
    )
    if limit is not None:
        query = query.limit(limit)
    if model is not None:
        query = query.where(Sample.model == model)
    if label is not None:
        query = query.where(VerdictRecord.label == label)
    if since is not None:
        query = query.where(Sample.received_at >= since)
    if until is not None:
        query = query.where(Sample.received_at < until)
    return [
        AuditRow(
            sample_id=s.id,
            model=s.model,
            received_at=s.received_at,
            request_id=s.request_id,
            response_id=s.response_id,
            traceparent=s.traceparent,
            choice_index=s.choice_index,
            word=t.word,
            category=t.category,
            position=t.position,
            label=VerdictLabel(v.label),
            hallucination_score=v.hallucination_score,
            prior_score=v.prior_score,
        )
        for s, t, v in session.execute(query).all()
    ]


@dataclass(frozen=True, kw_only=True, slots=True)
class JobRow:
    """The state of a sample's latest audit job."""

    status: str
    attempts: int
    error: str | None
    failure_reason: str | None


def latest_job(session: Session, sample_id: str) -> JobRow | None:
    job = (
        session.execute(select(Job).where(Job.sample_id == sample_id).order_by(Job.id.desc()))
        .scalars()
        .first()
    )
    if job is None:
        return None
    return JobRow(
        status=job.status.value,
        attempts=job.attempts,
        error=job.last_error,
        failure_reason=job.failure_reason,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportSummary:
    """A stored report as `/v1/reports` lists it."""

    id: str
    kind: str
    since: datetime
    until: datetime
    created_at: datetime
    hallucination_rate: float | None
    audited_words: int | None


def list_reports(session: Session, *, limit: int = 50) -> list[ReportSummary]:
    """Stored reports, newest period first."""
    rows = session.execute(select(Report).order_by(Report.period_end.desc()).limit(limit))
    return [
        ReportSummary(
            id=r.id,
            kind=r.kind,
            since=r.period_start,
            until=r.period_end,
            created_at=r.created_at,
            hallucination_rate=r.data.get("hallucination_rate"),
            audited_words=r.data.get("audited_words"),
        )
        for r in rows.scalars()
    ]


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportRow:
    """One stored report: its page and its data."""

    id: str
    kind: str
    html: str
    data: dict[str, Any]


def report(session: Session, report_id: str) -> ReportRow | None:
    row = session.get(Report, report_id)
    if row is None:
        return None
    return ReportRow(id=row.id, kind=row.kind, html=row.html, data=dict(row.data))


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportWord:
    """An audited word of a report's period.  The search numbers are None when the word was
    stored without its attribution."""

    token_pk: int
    word: str
    category: str
    label: VerdictLabel
    hallucination_score: float
    reason: str
    forward_passes: int | None
    seconds: float | None
    budget_exhausted: bool | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportSample:
    """A sample of a report's period with its audited words (in output order)."""

    id: str
    model: str
    received_at: datetime
    status: SampleStatus
    output: str
    raw_image: bool
    words: tuple[ReportWord, ...]


def report_samples(session: Session, since: datetime, until: datetime) -> list[ReportSample]:
    """The samples received in [since, until), oldest first, with their audited words (the
    images and region maps stay in the database: `heatmap_source` reads one word's)."""
    samples = session.execute(
        select(
            Sample.id,
            Sample.model,
            Sample.received_at,
            Sample.status,
            Sample.generated_text,
            Sample.image_data.is_not(None),
        )
        .where(Sample.received_at >= since, Sample.received_at < until)
        .order_by(Sample.received_at, Sample.id)
    ).all()
    words: dict[str, list[ReportWord]] = {}
    rows = session.execute(
        select(
            FlaggedToken.sample_id,
            FlaggedToken.id,
            FlaggedToken.word,
            FlaggedToken.category,
            VerdictRecord.label,
            VerdictRecord.hallucination_score,
            VerdictRecord.reason,
            AttributionRecord.forward_passes,
            AttributionRecord.seconds,
            AttributionRecord.stopped_by,
        )
        .join(Sample, Sample.id == FlaggedToken.sample_id)
        .join(VerdictRecord, VerdictRecord.token_pk == FlaggedToken.id)
        .outerjoin(AttributionRecord, AttributionRecord.token_pk == FlaggedToken.id)
        .where(Sample.received_at >= since, Sample.received_at < until)
        .order_by(FlaggedToken.sample_id, FlaggedToken.position, FlaggedToken.id)
    ).all()
    for sample_id, pk, word, category, label, score, reason, passes, seconds, stop in rows:
        words.setdefault(sample_id, []).append(
            ReportWord(
                token_pk=pk,
                word=word,
                category=category,
                label=VerdictLabel(label),
                hallucination_score=score,
                reason=reason,
                forward_passes=passes,
                seconds=seconds,
                budget_exhausted=None if stop is None else stop in _BUDGET_STOPS,
            )
        )
    return [
        ReportSample(
            id=sample_id,
            model=model,
            received_at=received,
            status=status,
            output=output,
            raw_image=bool(raw),
            words=tuple(words.get(sample_id, ())),
        )
        for sample_id, model, received, status, output, raw in samples
    ]


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class HeatmapSource:
    """What a word's heatmap is drawn from.

    Attributes:
        order: `(N,)` int, the search's region order.
        insertion, deletion: `(N + 1,)` float, NaN where not scored.
        labels: `(H, W)` int, the region label map.
        image_data: the stored upload (None unless the operator stores raw data).
    """

    order: np.ndarray
    insertion: np.ndarray
    deletion: np.ndarray
    labels: np.ndarray
    image_data: bytes | None


def heatmap_source(session: Session, token_pk: int) -> HeatmapSource | None:
    """The attribution and image of one audited word; None without an attribution."""
    row = session.execute(
        select(AttributionRecord, Sample.image_data)
        .join(FlaggedToken, FlaggedToken.id == AttributionRecord.token_pk)
        .join(Sample, Sample.id == FlaggedToken.sample_id)
        .where(AttributionRecord.token_pk == token_pk)
    ).one_or_none()
    if row is None:
        return None
    attribution, image_data = row

    def curve(values: list[Any]) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

    return HeatmapSource(
        order=np.asarray(attribution.order, dtype=np.int64),
        insertion=curve(attribution.insertion),
        deletion=curve(attribution.deletion),
        labels=label_map(attribution),
        image_data=image_data,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class WindowCounts:
    """Audited and hallucinated words of one model in a time window."""

    words: int
    hallucinated: int

    @property
    def rate(self) -> float:
        return self.hallucinated / self.words if self.words else 0.0


def window_counts(session: Session, model: str, since: datetime, until: datetime) -> WindowCounts:
    """Words of `model`'s samples received in [since, until) with a verdict, and how many of
    them count as hallucinations (`VerdictLabel.hallucinated()`)."""
    hallucinated = func.cast(VerdictRecord.label.in_(_HALLUCINATED), type_=Integer)
    row = session.execute(
        select(func.count(VerdictRecord.id), func.coalesce(func.sum(hallucinated), 0))
        .join(FlaggedToken, FlaggedToken.id == VerdictRecord.token_pk)
        .join(Sample, Sample.id == FlaggedToken.sample_id)
        .where(Sample.model == model, Sample.received_at >= since, Sample.received_at < until)
    ).one()
    return WindowCounts(words=int(row[0]), hallucinated=int(row[1]))


def hallucinated_categories(
    session: Session, model: str, since: datetime, *, limit: int = 5
) -> list[tuple[str, int]]:
    """The object categories most often judged hallucinated in `model`'s samples since
    `since`, most frequent first."""
    rows = session.execute(
        select(FlaggedToken.category, func.count())
        .join(VerdictRecord, VerdictRecord.token_pk == FlaggedToken.id)
        .join(Sample, Sample.id == FlaggedToken.sample_id)
        .where(
            Sample.model == model,
            Sample.received_at >= since,
            VerdictRecord.label.in_(_HALLUCINATED),
        )
        .group_by(FlaggedToken.category)
        .order_by(func.count().desc())
        .limit(limit)
    ).all()
    return [(str(c), int(n)) for c, n in rows]


def firing_alert_id(session: Session, model: str) -> int | None:
    """The id of `model`'s firing spike alert, if one fires."""
    return session.execute(
        select(Alert.id).where(Alert.model == model, Alert.state == "firing")
    ).scalar_one_or_none()


def firing_models(session: Session) -> set[str]:
    """The models with a firing spike alert."""
    query = select(Alert.model).where(Alert.state == "firing").distinct()
    return set(session.execute(query).scalars())


@dataclass(frozen=True, kw_only=True, slots=True)
class AlertRow:
    id: int
    model: str
    state: str
    started_at: datetime


def alerts(session: Session) -> list[AlertRow]:
    """Every recorded spike alert, oldest first."""
    rows = session.execute(select(Alert).order_by(Alert.started_at, Alert.id)).scalars()
    return [AlertRow(id=a.id, model=a.model, state=a.state, started_at=a.started_at) for a in rows]


def sample_status_counts(session: Session) -> Counter[SampleStatus]:
    """How many samples are in each status."""
    rows = session.execute(select(Sample.status, func.count()).group_by(Sample.status)).all()
    return Counter({SampleStatus(status): int(n) for status, n in rows})


def verdict_counts(session: Session) -> Counter[VerdictLabel]:
    """How many stored verdicts carry each label."""
    query = select(VerdictRecord.label, func.count()).group_by(VerdictRecord.label)
    return Counter({VerdictLabel(label): int(n) for label, n in session.execute(query).all()})
