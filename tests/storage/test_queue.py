"""Migrations and the job queue, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, inspect

from storage.engine import (
    HEAD,
    UnmigratedDatabaseError,
    check_migrated,
    current_revision,
    session_factory,
    upgrade,
)
from storage.models import Job, JobStatus, Sample, utcnow
from storage.queue import claim, complete, depth, enqueue, extend, fail


def _sample(model: str = "reference") -> Sample:
    return Sample(
        model=model,
        image_sha256="0" * 64,
        image_width=96,
        image_height=96,
        generated_text="fork knife .",
        token_ids=[23, 24, 10],
        extra={},
    )


def test_an_unmigrated_database_is_refused_with_the_fix(engine: Engine) -> None:
    with pytest.raises(UnmigratedDatabaseError, match="guardrail db upgrade"):
        check_migrated(engine)
    upgrade(engine)
    check_migrated(engine)
    assert current_revision(engine) == HEAD
    tables = set(inspect(engine).get_table_names())
    assert {"samples", "flagged_tokens", "attributions", "verdicts", "jobs"} <= tables
    upgrade(engine)  # idempotent


def test_a_sample_and_its_job_are_written_together_and_claimed_once(engine: Engine) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        sample = _sample()
        session.add(sample)
        session.flush()
        enqueue(session, sample.id)
    with sessions.begin() as session:
        job = claim(session, "worker-a", lease_seconds=30)
        assert job is not None and job.status is JobStatus.RUNNING and job.attempts == 1
        job_id = job.id
    with sessions.begin() as session:
        assert claim(session, "worker-b") is None  # leased by worker-a
        assert extend(session, job_id, "worker-a", lease_seconds=30)
        assert not complete(session, job_id, "worker-b")
        assert complete(session, job_id, "worker-a")
    with sessions.begin() as session:
        assert session.get(Job, job_id).status is JobStatus.DONE  # type: ignore[union-attr]
        assert depth(session).queued == 0


def test_an_expired_lease_returns_the_job_and_the_old_owner_loses_it(engine: Engine) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        sample = _sample()
        session.add(sample)
        session.flush()
        job_id = enqueue(session, sample.id).id
    with sessions.begin() as session:
        assert claim(session, "dead-worker", lease_seconds=5) is not None
    later = utcnow() + timedelta(seconds=10)
    with sessions.begin() as session:
        job = claim(session, "worker-b", now=later)
        assert job is not None and job.id == job_id and job.attempts == 2
    with sessions.begin() as session:
        assert not complete(session, job_id, "dead-worker")  # its late result is refused
        assert complete(session, job_id, "worker-b")


def test_failures_back_off_then_give_up(engine: Engine) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        sample = _sample()
        session.add(sample)
        session.flush()
        job_id = enqueue(session, sample.id, max_attempts=2).id
    with sessions.begin() as session:
        claim(session, "w")
        assert fail(session, job_id, "w", "scorer crashed", backoff_seconds=60) is JobStatus.QUEUED
    with sessions.begin() as session:
        assert claim(session, "w") is None  # backing off
        assert depth(session).queued == 1
        job = claim(session, "w", now=utcnow() + timedelta(seconds=61))
        assert job is not None and job.attempts == 2
        assert fail(session, job_id, "w", "again") is JobStatus.FAILED
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status is JobStatus.FAILED and job.last_error == "again"
        assert claim(session, "w", now=utcnow() + timedelta(days=1)) is None


def test_deleting_a_sample_deletes_its_tokens_and_jobs(engine: Engine) -> None:
    from storage.models import FlaggedToken

    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        sample = _sample()
        sample.tokens.append(FlaggedToken(position=0, token_id=23, word="fork", category="fork"))
        session.add(sample)
        session.flush()
        enqueue(session, sample.id)
        sample_id = sample.id
    with sessions.begin() as session:
        session.delete(session.get(Sample, sample_id))
    with sessions.begin() as session:
        assert session.query(FlaggedToken).count() == 0
        assert session.query(Job).count() == 0


def test_the_shipped_migrations_match_the_models(engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from storage.models import Base

    upgrade(engine)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def _one_job(engine: Engine, max_attempts: int = 3) -> int:
    upgrade(engine)
    with session_factory(engine).begin() as session:
        sample = _sample()
        session.add(sample)
        session.flush()
        return enqueue(session, sample.id, max_attempts=max_attempts).id


def test_a_job_whose_workers_keep_dying_fails_as_worker_crashed(engine: Engine) -> None:
    from storage.models import SampleStatus
    from storage.queue import FailureReason, fail_abandoned

    job_id = _one_job(engine, max_attempts=3)
    sessions = session_factory(engine)
    now = utcnow()
    for attempt in range(1, 4):  # each claim's worker dies: its lease runs out
        now += timedelta(seconds=120)
        with sessions.begin() as session:
            assert fail_abandoned(session, now) == []
            job = claim(session, f"victim-{attempt}", lease_seconds=60, now=now)
            assert job is not None and job.attempts == attempt
    now += timedelta(seconds=120)
    with sessions.begin() as session:
        assert claim(session, "next", now=now) is None  # out of attempts: never claimed again
        failed = fail_abandoned(session, now)
        assert [(f.job_id, f.attempts, f.model) for f in failed] == [(job_id, 3, "reference")]
        assert fail_abandoned(session, now) == []  # once
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status is JobStatus.FAILED
        assert job.failure_reason == FailureReason.WORKER_CRASHED
        assert job.last_error is not None and "worker_crashed" in job.last_error
        assert job.image_data is None
        sample = session.get(Sample, job.sample_id)
        assert sample is not None and sample.status is SampleStatus.FAILED


def test_the_last_attempt_is_not_failed_while_its_lease_runs(engine: Engine) -> None:
    from storage.queue import fail_abandoned

    _one_job(engine, max_attempts=1)
    sessions = session_factory(engine)
    now = utcnow()
    with sessions.begin() as session:
        assert claim(session, "w", lease_seconds=60, now=now) is not None
    with sessions.begin() as session:  # one second before the lease runs out
        assert fail_abandoned(session, now + timedelta(seconds=59)) == []
        assert claim(session, "other", now=now + timedelta(seconds=59)) is None
    with sessions.begin() as session:
        assert len(fail_abandoned(session, now + timedelta(seconds=61))) == 1


def test_a_released_job_is_claimable_at_once_and_the_attempt_is_not_counted(
    engine: Engine,
) -> None:
    from storage.queue import release

    job_id = _one_job(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        assert claim(session, "stopping", lease_seconds=600) is not None
    with sessions.begin() as session:
        assert not release(session, job_id, "someone-else")
        assert release(session, job_id, "stopping")
    with sessions.begin() as session:
        job = claim(session, "next")
        assert job is not None and job.id == job_id and job.attempts == 1
        assert not complete(session, job_id, "stopping")  # the released lease is gone


def test_live_workers_are_counted_from_recent_heartbeats(engine: Engine) -> None:
    from storage.queue import beat, forget_stale_workers, forget_worker, live_workers

    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        assert depth(session).live_workers == 0
        beat(session, "host:1:a", hostname="host", pid=1)
        beat(session, "host:2:b", hostname="host", pid=2, job_id=7)
        beat(session, "host:2:b", hostname="host", pid=2)  # an update, not a new worker
    with sessions.begin() as session:
        assert depth(session).live_workers == 2
        later = utcnow() + timedelta(seconds=31)
        assert live_workers(session, within_seconds=30, now=later) == 0  # heartbeats went stale
        forget_worker(session, "host:1:a")
    with sessions.begin() as session:
        assert live_workers(session, within_seconds=30) == 1
        later = utcnow() + timedelta(hours=2)
        assert forget_stale_workers(session, older_than_seconds=3600) == 0
        assert forget_stale_workers(session, older_than_seconds=3600, now=later) == 1
        assert live_workers(session, within_seconds=10**6) == 0
