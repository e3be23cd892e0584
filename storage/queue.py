"""The durable job queue: one job row per sampled sample, claimed with a lease.

Functions take a session and never commit: the caller owns the transaction (a sample and its
job are written in the same one).  A claim is a conditional UPDATE (the row must still be
claimable), so two workers can never both own a job; on PostgreSQL the candidate is also
selected `FOR UPDATE SKIP LOCKED`, so concurrent workers skip each other's rows instead of
waiting.  A job whose lease ran out (its worker died) is claimable again while it has attempts
left; every claim counts an attempt, so a job that keeps killing its workers (a segfault, the
OOM killer) fails with reason `worker_crashed` once `max_attempts` claims have died, instead of
looping.  Workers record heartbeats in the `workers` table, so live workers can be counted.
Every function that reads the time takes `now` (the wall clock when omitted), so tests drive
leases, backoff and heartbeat windows with a fixed clock instead of sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from storage.models import Job, JobStatus, Sample, SampleStatus, WorkerRecord, utcnow

__all__ = [
    "FailedJob",
    "FailureReason",
    "QueueDepth",
    "beat",
    "claim",
    "complete",
    "depth",
    "enqueue",
    "extend",
    "fail",
    "fail_abandoned",
    "forget_stale_workers",
    "forget_worker",
    "live_workers",
    "release",
    "requeue_expired",
]


class FailureReason:
    """Why a job ended FAILED (the `jobs.failure_reason` column and the metric label)."""

    INVALID_INPUT = "invalid_input"  # the sample cannot be audited; retrying cannot help
    ERROR = "error"  # every attempt raised
    WORKER_CRASHED = "worker_crashed"  # every attempt's worker died (lease expired)


@dataclass(frozen=True, slots=True)
class QueueDepth:
    queued: int
    running: int
    oldest_age_seconds: float
    live_workers: int = 0


@dataclass(frozen=True, slots=True)
class FailedJob:
    job_id: int
    sample_id: str
    model: str
    attempts: int


def enqueue(
    session: Session,
    sample_id: str,
    *,
    max_attempts: int = 5,
    image_data: bytes | None = None,
    prompt: str | None = None,
    flush: bool = True,
) -> Job:
    """A job for `sample_id`; `image_data` and `prompt` ride with it until it is finished.
    `flush=False` leaves the INSERT to the session's next flush."""
    job = Job(sample_id=sample_id, max_attempts=max_attempts, image_data=image_data, prompt=prompt)
    session.add(job)
    if flush:
        session.flush()
    return job


def _expired(now: datetime) -> ColumnElement[bool]:
    return and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)


def _claimable(now: datetime) -> ColumnElement[bool]:
    return or_(
        and_(Job.status == JobStatus.QUEUED, Job.run_after <= now),
        and_(_expired(now), Job.attempts < Job.max_attempts),
    )


def fail_abandoned(session: Session, now: datetime | None = None) -> list[FailedJob]:
    """Fail the jobs whose worker died on their last attempt (lease expired, no attempts left)
    with reason `worker_crashed`, and their samples; returns them.  Called before every claim
    (so it works without the scheduler) and by the scheduler's lease reaper."""
    now = now or utcnow()
    query = (
        select(Job.id, Job.sample_id, Sample.model, Job.attempts)
        .join(Sample, Sample.id == Job.sample_id)
        .where(_expired(now), Job.attempts >= Job.max_attempts)
        .limit(100)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=Job)
    failed = []
    for job_id, sample_id, model, attempts in session.execute(query).all():
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, _expired(now), Job.attempts >= Job.max_attempts)
            .values(
                status=JobStatus.FAILED,
                failure_reason=FailureReason.WORKER_CRASHED,
                last_error=f"worker_crashed: the worker auditing this job died on each of its "
                f"{attempts} attempts (its lease expired); the sample may crash the auditor",
                finished_at=now,
                lease_owner=None,
                lease_expires_at=None,
                image_data=None,
                prompt=None,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            session.execute(
                update(Sample)
                .where(Sample.id == sample_id)
                .values(status=SampleStatus.FAILED)
                .execution_options(synchronize_session=False)
            )
            failed.append(FailedJob(job_id, sample_id, model, int(attempts)))
    return failed


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


def extend(
    session: Session,
    job_id: int,
    owner: str,
    *,
    lease_seconds: float = 60.0,
    now: datetime | None = None,
) -> bool:
    """Push the lease forward; False if `owner` no longer holds the job."""
    result = session.execute(
        update(Job)
        .where(_owned(job_id, owner))
        .values(lease_expires_at=(now or utcnow()) + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def complete(session: Session, job_id: int, owner: str, *, now: datetime | None = None) -> bool:
    """Mark the job done; False if `owner` lost it (its work must not be committed)."""
    result = session.execute(
        update(Job)
        .where(_owned(job_id, owner))
        .values(
            status=JobStatus.DONE,
            finished_at=now or utcnow(),
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
    now: datetime | None = None,
) -> JobStatus | None:
    """Record a failed attempt: back to the queue after an exponential backoff, or FAILED once
    `max_attempts` are spent or when the error is `permanent` (bad input: retrying cannot
    help).  None if `owner` no longer holds the job."""
    now = now or utcnow()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.lease_owner != owner or job.status != JobStatus.RUNNING:
        return None
    job.last_error = error[:4000]
    job.lease_owner = None
    job.lease_expires_at = None
    if permanent or job.attempts >= job.max_attempts:
        job.status = JobStatus.FAILED
        job.failure_reason = FailureReason.INVALID_INPUT if permanent else FailureReason.ERROR
        job.finished_at = now
        job.image_data = job.prompt = None
    else:
        job.status = JobStatus.QUEUED
        job.run_after = now + timedelta(seconds=backoff_seconds * 2 ** (job.attempts - 1))
    session.flush()
    return job.status


def requeue_expired(session: Session, now: datetime | None = None) -> int:
    """Put the jobs whose worker died (lease expired) and that have attempts left back in the
    queue at once; returns how many.  A claim takes them anyway: this keeps the queue's
    numbers honest while no worker runs."""
    now = now or utcnow()
    result = session.execute(
        update(Job)
        .where(_expired(now), Job.attempts < Job.max_attempts)
        .values(status=JobStatus.QUEUED, lease_owner=None, lease_expires_at=None, run_after=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def release(session: Session, job_id: int, owner: str, *, now: datetime | None = None) -> bool:
    """Give a job back without counting the attempt (a clean stop, not a failure); False if
    `owner` no longer holds it."""
    result = session.execute(
        update(Job)
        .where(_owned(job_id, owner))
        .values(
            status=JobStatus.QUEUED,
            lease_owner=None,
            lease_expires_at=None,
            run_after=now or utcnow(),
            attempts=func.max(Job.attempts - 1, 0)
            if session.get_bind().dialect.name == "sqlite"
            else func.greatest(Job.attempts - 1, 0),
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.execute(
        update(Sample)
        .where(Sample.id == select(Job.sample_id).where(Job.id == job_id).scalar_subquery())
        .values(status=SampleStatus.QUEUED)
        .execution_options(synchronize_session=False)
    )
    return True


def beat(
    session: Session,
    worker_id: str,
    *,
    hostname: str,
    pid: int,
    job_id: int | None = None,
    now: datetime | None = None,
) -> None:
    """Record that worker `worker_id` is alive (and which job it audits)."""
    now = now or utcnow()
    row = session.get(WorkerRecord, worker_id)
    if row is None:
        session.add(
            WorkerRecord(
                id=worker_id,
                hostname=hostname[:255],
                pid=pid,
                started_at=now,
                last_seen_at=now,
                job_id=job_id,
            )
        )
    else:
        row.last_seen_at = now
        row.job_id = job_id
    session.flush()


def forget_worker(session: Session, worker_id: str) -> None:
    """A worker stopped cleanly: it no longer counts as live."""
    session.execute(delete(WorkerRecord).where(WorkerRecord.id == worker_id))


def forget_stale_workers(
    session: Session, *, older_than_seconds: float, now: datetime | None = None
) -> int:
    """Remove the heartbeat rows of workers silent for `older_than_seconds` (they died without
    stopping cleanly); returns how many."""
    since = (now or utcnow()) - timedelta(seconds=older_than_seconds)
    result = session.execute(delete(WorkerRecord).where(WorkerRecord.last_seen_at < since))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def live_workers(session: Session, *, within_seconds: float, now: datetime | None = None) -> int:
    """Workers whose last heartbeat is at most `within_seconds` old."""
    now = now or utcnow()
    since = now - timedelta(seconds=within_seconds)
    return int(
        session.execute(
            select(func.count()).select_from(WorkerRecord).where(WorkerRecord.last_seen_at >= since)
        ).scalar_one()
    )


def depth(
    session: Session, now: datetime | None = None, *, live_within_seconds: float = 30.0
) -> QueueDepth:
    """Jobs waiting and running, the age of the oldest waiting one, and live workers."""
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
        live_workers=live_workers(session, within_seconds=live_within_seconds, now=now),
    )
