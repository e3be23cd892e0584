"""Deleting what is older than the retention cutoff, one batch per call (the caller owns the
transaction and loops, so no transaction holds the tables for long)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from storage.models import Alert, Job, Report, Sample

__all__ = ["delete_alerts_before", "delete_reports_before", "delete_samples_before"]


def delete_samples_before(session: Session, cutoff: datetime, *, batch: int) -> int:
    """Delete up to `batch` samples received before `cutoff`, with their tokens,
    attributions, verdicts, jobs and raw media; returns how many."""
    ids = list(
        session.execute(select(Sample.id).where(Sample.received_at < cutoff).limit(batch))
        .scalars()
        .all()
    )
    if not ids:
        return 0
    session.execute(delete(Job).where(Job.sample_id.in_(ids)))
    for sample in session.execute(select(Sample).where(Sample.id.in_(ids))).scalars():
        session.delete(sample)  # the ORM cascades to tokens, attributions and verdicts
    session.flush()
    return len(ids)


def delete_reports_before(session: Session, cutoff: datetime, *, batch: int) -> int:
    """Delete up to `batch` reports whose period starts before `cutoff`; returns how many."""
    ids = list(
        session.execute(select(Report.id).where(Report.period_start < cutoff).limit(batch))
        .scalars()
        .all()
    )
    if ids:
        session.execute(
            delete(Report).where(Report.id.in_(ids)).execution_options(synchronize_session=False)
        )
    return len(ids)


def delete_alerts_before(session: Session, cutoff: datetime, *, batch: int) -> int:
    """Delete up to `batch` alerts that started before `cutoff` (their notifications
    cascade); returns how many."""
    ids = list(
        session.execute(select(Alert.id).where(Alert.started_at < cutoff).limit(batch))
        .scalars()
        .all()
    )
    if ids:
        session.execute(
            delete(Alert).where(Alert.id.in_(ids)).execution_options(synchronize_session=False)
        )
    return len(ids)
