"""The queue's timing rules at their boundaries, with the clock passed in (no sleeping).

Every queue function takes `now`; these tests drive it by hand, so a lease, a backoff or a
heartbeat window that is off by a second fails here whatever the machine's speed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Engine

from storage.engine import session_factory, upgrade
from storage.models import Job, JobStatus, Sample, WorkerRecord, utcnow
from storage.queue import (
    beat,
    claim,
    complete,
    extend,
    fail,
    fail_abandoned,
    live_workers,
    release,
    requeue_expired,
)

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=utcnow().tzinfo)
MS = timedelta(milliseconds=1)


def _job(engine: Engine, *, max_attempts: int = 5) -> int:
    from storage.queue import enqueue

    upgrade(engine)
    with session_factory(engine).begin() as session:
        sample = Sample(
            model="reference",
            image_sha256="0" * 64,
            image_width=96,
            image_height=96,
            generated_text="fork knife .",
            token_ids=[23, 24, 10],
            extra={},
            received_at=T0,
        )
        session.add(sample)
        session.flush()
        job = enqueue(session, sample.id, max_attempts=max_attempts)
        job.run_after = T0
        job.created_at = T0
        session.flush()
        return job.id


def test_a_lease_is_held_until_its_last_millisecond(engine: Engine) -> None:
    job_id = _job(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        assert claim(session, "a", lease_seconds=60, now=T0) is not None
    expiry = T0 + timedelta(seconds=60)
    with sessions.begin() as session:
        assert claim(session, "b", now=expiry - MS) is None
        assert claim(session, "b", now=expiry) is None  # expired means strictly after
        assert requeue_expired(session, expiry) == 0
    with sessions.begin() as session:
        job = claim(session, "b", lease_seconds=60, now=expiry + MS)
        assert job is not None and job.id == job_id and job.lease_owner == "b"
        assert job.attempts == 2


def test_extending_a_lease_moves_its_expiry_from_now(engine: Engine) -> None:
    job_id = _job(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        claim(session, "a", lease_seconds=10, now=T0)
    with sessions.begin() as session:
        assert extend(session, job_id, "a", lease_seconds=10, now=T0 + timedelta(seconds=9))
        assert not extend(session, job_id, "b", lease_seconds=10, now=T0)
    with sessions.begin() as session:  # the old expiry has passed, the new one has not
        assert claim(session, "b", now=T0 + timedelta(seconds=19) - MS) is None
        assert claim(session, "b", now=T0 + timedelta(seconds=19) + MS) is not None


def test_backoff_doubles_with_each_attempt(engine: Engine) -> None:
    job_id = _job(engine, max_attempts=5)
    sessions = session_factory(engine)
    now = T0
    waits = []
    for attempt in range(1, 5):
        with sessions.begin() as session:
            job = claim(session, "w", lease_seconds=60, now=now)
            assert job is not None and job.attempts == attempt
            assert fail(session, job_id, "w", "boom", backoff_seconds=5, now=now) is (
                JobStatus.QUEUED
            )
        with sessions.begin() as session:
            run_after = session.get(Job, job_id).run_after  # type: ignore[union-attr]
            if run_after.tzinfo is None:  # SQLite drops the zone
                run_after = run_after.replace(tzinfo=T0.tzinfo)
            waits.append((run_after - now).total_seconds())
            assert claim(session, "w", now=run_after - MS) is None  # still backing off
        now = run_after
    assert waits == [5.0, 10.0, 20.0, 40.0]
    with sessions.begin() as session:
        claim(session, "w", now=now)
        assert fail(session, job_id, "w", "last", backoff_seconds=5, now=now) is JobStatus.FAILED


def test_the_reaper_fails_a_job_on_exactly_its_last_attempt(engine: Engine) -> None:
    job_id = _job(engine, max_attempts=2)
    sessions = session_factory(engine)
    now = T0
    for owner in ("first", "second"):
        with sessions.begin() as session:
            assert fail_abandoned(session, now) == []
            assert claim(session, owner, lease_seconds=60, now=now) is not None
        now += timedelta(seconds=60) + MS
    with sessions.begin() as session:  # attempts == max_attempts and the lease ran out
        assert requeue_expired(session, now) == 0
        assert [f.job_id for f in fail_abandoned(session, now)] == [job_id]


def test_a_job_with_attempts_left_is_requeued_not_failed(engine: Engine) -> None:
    job_id = _job(engine, max_attempts=2)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        claim(session, "dies", lease_seconds=60, now=T0)
    later = T0 + timedelta(seconds=61)
    with sessions.begin() as session:
        assert fail_abandoned(session, later) == []
        assert requeue_expired(session, later) == 1
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status is JobStatus.QUEUED and job.lease_owner is None


def test_completion_and_release_are_stamped_with_the_given_time(engine: Engine) -> None:
    job_id = _job(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        claim(session, "a", now=T0)
        assert release(session, job_id, "a", now=T0 + timedelta(seconds=3))
    with sessions.begin() as session:
        assert claim(session, "b", now=T0 + timedelta(seconds=3) - MS) is None
        assert claim(session, "b", now=T0 + timedelta(seconds=3)) is not None
        assert complete(session, job_id, "b", now=T0 + timedelta(seconds=4))
    with sessions.begin() as session:
        finished = session.get(Job, job_id).finished_at  # type: ignore[union-attr]
        assert finished is not None
        assert finished.replace(tzinfo=T0.tzinfo) == T0 + timedelta(seconds=4)


def test_a_heartbeat_counts_for_exactly_its_window(engine: Engine) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        beat(session, "h:1:a", hostname="h", pid=1, now=T0)
    with sessions.begin() as session:
        assert live_workers(session, within_seconds=30, now=T0 + timedelta(seconds=30)) == 1
        assert live_workers(session, within_seconds=30, now=T0 + timedelta(seconds=30) + MS) == 0
        beat(session, "h:1:a", hostname="h", pid=1, job_id=3, now=T0 + timedelta(seconds=31))
    with sessions.begin() as session:
        assert live_workers(session, within_seconds=30, now=T0 + timedelta(seconds=60)) == 1
        row = session.get(WorkerRecord, "h:1:a")
        assert row is not None and row.job_id == 3
