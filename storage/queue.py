"""The durable job queue: one job row per sampled sample, claimed with a lease.

Functions take a session and never commit: the caller owns the transaction (a sample and its
job are written in the same one).  A claim is a conditional UPDATE (the row must still be
claimable), so two workers can never both own a job; on PostgreSQL the candidate is also
selected `FOR UPDATE SKIP LOCKED`, so concurrent workers skip each other's rows instead of
waiting.  A job whose lease ran out (its worker died) is claimable again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from storage.models import Job, JobStatus, utcnow

__all__ = ["QueueDepth", "claim", "complete", "depth", "enqueue", "extend", "fail"]


@dataclass(frozen=True, slots=True)
class QueueDepth:
    queued: int
    running: int
    oldest_age_seconds: float


def enqueue(
    session: Session,
    sample_id: str,
    *,
    max_attempts: int = 5,
    image_data: bytes | None = None,
    prompt: str | None = None,
) -> Job:
    """A job for `sample_id`; `image_data` and `prompt` ride with it until it is finished."""
    job = Job(sample_id=sample_id, max_attempts=max_attempts, image_data=image_data, prompt=prompt)
    session.add(job)
    session.flush()
    return job


def _claimable(now: datetime) -> ColumnElement[bool]:
    return or_(
        and_(Job.status == JobStatus.QUEUED, Job.run_after <= now),
        and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
    )


def claim(
    session: Session, owner: str, *, lease_seconds: float = 60.0, now: datetime | None = None
) -> Job | None:
    """Claim the oldest claimable job for `owner`, or None when there is none."""
    now = now or utcnow()
    for _ in range(8):  # another worker may win the race for a candidate: try the next one
        query = select(Job.id).where(_claimable(now)).order_by(Job.run_after, Job.id).limit(1)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        job_id = session.execute(query).scalar_one_or_none()
        if job_id is None:
            return None
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, _claimable(now))
            .values(
                status=JobStatus.RUNNING,
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=Job.attempts + 1,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            job = session.get(Job, job_id, populate_existing=True)
            return job
    return None


def _owned(job_id: int, owner: str) -> ColumnElement[bool]:
    return and_(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)


def extend(session: Session, job_id: int, owner: str, *, lease_seconds: float = 60.0) -> bool:
    """Push the lease forward; False if `owner` no longer holds the job."""
    result = session.execute(
        update(Job)
        .where(_owned(job_id, owner))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def complete(session: Session, job_id: int, owner: str) -> bool:
    """Mark the job done; False if `owner` lost it (its work must not be committed)."""
    result = session.execute(
        update(Job)
        .where(_owned(job_id, owner))
        .values(
            status=JobStatus.DONE,
            finished_at=utcnow(),
            lease_owner=None,
            image_data=None,
            prompt=None,
        )
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def fail(
    session: Session,
    job_id: int,
    owner: str,
    error: str,
    *,
    backoff_seconds: float = 5.0,
    permanent: bool = False,
) -> JobStatus | None:
    """Record a failed attempt: back to the queue after an exponential backoff, or FAILED once
    `max_attempts` are spent or when the error is `permanent` (bad input: retrying cannot
    help).  None if `owner` no longer holds the job."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.lease_owner != owner or job.status != JobStatus.RUNNING:
        return None
    job.last_error = error[:4000]
    job.lease_owner = None
    job.lease_expires_at = None
    if permanent or job.attempts >= job.max_attempts:
        job.status = JobStatus.FAILED
        job.finished_at = utcnow()
        job.image_data = job.prompt = None
    else:
        job.status = JobStatus.QUEUED
        job.run_after = utcnow() + timedelta(seconds=backoff_seconds * 2 ** (job.attempts - 1))
    session.flush()
    return job.status


def depth(session: Session, now: datetime | None = None) -> QueueDepth:
    """Jobs waiting and running, and the age of the oldest waiting one."""
    now = now or utcnow()
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    counts = {status: count for status, count in rows}
    oldest = session.execute(
        select(func.min(Job.created_at)).where(Job.status == JobStatus.QUEUED)
    ).scalar_one_or_none()
    if oldest is not None and oldest.tzinfo is None:  # SQLite drops the zone
        oldest = oldest.replace(tzinfo=now.tzinfo)
    age = (now - oldest).total_seconds() if oldest is not None else 0.0
    return QueueDepth(
        queued=int(counts.get(JobStatus.QUEUED, 0)),
        running=int(counts.get(JobStatus.RUNNING, 0)),
        oldest_age_seconds=max(0.0, age),
    )
