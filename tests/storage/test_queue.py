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
