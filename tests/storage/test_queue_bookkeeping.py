"""The queue's bookkeeping, field by field, with the clock passed in.

Each test pins what a queue function writes or returns (every column it sets or clears, the
numbers it reports, the row it picks), so that a dropped assignment or a loosened condition in
`storage/queue.py` fails here; `docs/mutation.md` lists the mutants these tests were written
against and the few that no test can tell apart.  The two PostgreSQL-only tests hold a row lock
in a second session and check that the queue skips the locked row instead of waiting for it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text, update
from sqlalchemy.orm import Session

from storage.engine import make_engine, session_factory, upgrade
from storage.models import Job, JobStatus, Sample, SampleStatus, WorkerRecord, utcnow
from storage.queue import (
    FailedJob,
    FailureReason,
    beat,
    claim,
    complete,
    depth,
    enqueue,
    extend,
    fail,
    fail_abandoned,
    forget_stale_workers,
    forget_worker,
    release,
    requeue_expired,
)
from tests.postgres import schema_url

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=utcnow().tzinfo)
MS = timedelta(milliseconds=1)
SECOND = timedelta(seconds=1)


def _at(value: datetime | None) -> datetime | None:
    """A stored time with its zone (SQLite drops it)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=T0.tzinfo)


def _new_sample(model: str = "reference") -> Sample:
    return Sample(
        id=uuid.uuid4().hex,
        model=model,
        image_sha256="0" * 64,
        image_width=96,
        image_height=96,
        generated_text="fork knife .",
        token_ids=[23, 24, 10],
        extra={},
        received_at=T0,
    )


def _sample(session: Session, model: str = "reference") -> str:
    sample = _new_sample(model)
    session.add(sample)
    session.flush()
    return sample.id


def _jobs(
    engine: Engine,
    n: int = 1,
    *,
    max_attempts: int = 5,
    run_after: datetime = T0,
    model: str = "reference",
) -> list[int]:
    """`n` queued jobs, each with its own sample, created and runnable at `run_after` (written
    in one flush: the crowd tests make hundreds)."""
    upgrade(engine)
    with session_factory(engine).begin() as session:
        samples = [_new_sample(model) for _ in range(n)]
        session.add_all(samples)
        session.flush()
        jobs = [
            Job(
                sample_id=sample.id,
                max_attempts=max_attempts,
                image_data=b"\x89PNG",
                prompt="what is on the table?",
                run_after=run_after,
                created_at=run_after,
            )
            for sample in samples
        ]
        session.add_all(jobs)
        session.flush()
        ids = [job.id for job in jobs]
    assert ids == sorted(ids)  # written in order: the tie-break tests rely on it
    return ids


def _job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    return job


# enqueue


def test_enqueue_keeps_the_image_and_prompt_and_allows_five_attempts(engine: Engine) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        job_id = enqueue(
            session, _sample(session), image_data=b"\x89PNG", prompt="what is on the table?"
        ).id
    with sessions.begin() as session:
        job = _job(session, job_id)
        assert (job.max_attempts, job.attempts, job.status) == (5, 0, JobStatus.QUEUED)
        assert (job.image_data, job.prompt) == (b"\x89PNG", "what is on the table?")


# claim


def test_claim_takes_the_earliest_runnable_job_and_only_that_one(engine: Engine) -> None:
    later, earlier = _jobs(engine, 1, run_after=T0 + SECOND) + _jobs(engine, 1, run_after=T0)
    sessions = session_factory(engine)
    with sessions.begin() as session:  # created second, but due first
        job = claim(session, "w", now=T0 + 2 * SECOND)
        assert job is not None and job.id == earlier
    with sessions.begin() as session:
        assert _job(session, later).status is JobStatus.QUEUED
        assert _job(session, later).lease_owner is None


def test_claim_breaks_a_tie_on_run_after_by_job_id(engine: Engine) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        # the higher id is written first: on PostgreSQL an unordered scan meets it first
        for job_id in (2, 1):
            sample = _new_sample()
            session.add(sample)
            session.flush()
            session.add(Job(id=job_id, sample_id=sample.id, run_after=T0, created_at=T0))
            session.flush()
    with sessions.begin() as session:
        assert [claim(session, "w", now=T0).id for _ in range(2)] == [1, 2]  # type: ignore[union-attr]
        assert claim(session, "w", now=T0) is None


def test_claim_leases_for_sixty_seconds_by_default(engine: Engine) -> None:
    (job_id,) = _jobs(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        job = claim(session, "w", now=T0)
        assert job is not None and job.lease_owner == "w" and job.attempts == 1
    with sessions.begin() as session:
        assert _at(_job(session, job_id).lease_expires_at) == T0 + 60 * SECOND


def test_claim_returns_the_claimed_row_even_when_the_session_held_it(engine: Engine) -> None:
    upgrade(engine)
    with session_factory(engine).begin() as session:
        queued = enqueue(session, _sample(session))  # the session's copy says QUEUED
        queued.run_after = T0
        session.flush()
        job = claim(session, "w", lease_seconds=10, now=T0)
        assert job is not None and job.status is JobStatus.RUNNING
        assert (job.lease_owner, job.attempts) == ("w", 1)
        assert _at(job.lease_expires_at) == T0 + 10 * SECOND


# extend, complete, release: only the owner's job, only that job


def test_extend_leases_for_sixty_seconds_by_default(engine: Engine) -> None:
    (job_id,) = _jobs(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        claim(session, "w", lease_seconds=5, now=T0)
        assert extend(session, job_id, "w", now=T0 + SECOND)
    with sessions.begin() as session:
        assert _at(_job(session, job_id).lease_expires_at) == T0 + 61 * SECOND


def test_complete_finishes_only_that_job_and_clears_what_the_audit_needed(
    engine: Engine,
) -> None:
    first, second = _jobs(engine, 2)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        claim(session, "w", now=T0)
        claim(session, "w", now=T0)  # one owner, two running jobs
        assert complete(session, first, "w", now=T0 + SECOND)
    with sessions.begin() as session:
        done, running = _job(session, first), _job(session, second)
        assert done.status is JobStatus.DONE and _at(done.finished_at) == T0 + SECOND
        assert (done.lease_owner, done.image_data, done.prompt) == (None, None, None)
        assert running.status is JobStatus.RUNNING and running.lease_owner == "w"
        assert running.image_data == b"\x89PNG"
        assert not complete(session, first, "w", now=T0)  # done once


def test_release_gives_back_the_job_and_its_sample_only(engine: Engine) -> None:
    first, second = _jobs(engine, 2, max_attempts=5)
    sessions = session_factory(engine)
    with sessions.begin() as session:  # the first job's second attempt, both samples auditing
        claim(session, "w", now=T0)
        assert fail(session, first, "w", "boom", backoff_seconds=1, now=T0) is JobStatus.QUEUED
        assert claim(session, "w", now=T0 + SECOND).id == second  # type: ignore[union-attr]
        assert claim(session, "w", now=T0 + SECOND).id == first  # type: ignore[union-attr]
        session.execute(update(Sample).values(status=SampleStatus.AUDITING))
    with sessions.begin() as session:
        assert release(session, first, "w", now=T0 + 3 * SECOND)
    with sessions.begin() as session:
        released, other = _job(session, first), _job(session, second)
        assert released.status is JobStatus.QUEUED and released.attempts == 1
        assert (released.lease_owner, released.lease_expires_at) == (None, None)
        assert _at(released.run_after) == T0 + 3 * SECOND
        assert other.status is JobStatus.RUNNING and other.attempts == 1
        statuses = {
            sample_id: status
            for sample_id, status in session.execute(select(Sample.id, Sample.status)).all()
        }
        assert statuses == {
            released.sample_id: SampleStatus.QUEUED,
            other.sample_id: SampleStatus.AUDITING,
        }


# fail


def test_fail_backs_off_five_seconds_by_default_and_clears_the_lease(engine: Engine) -> None:
    (job_id,) = _jobs(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        claim(session, "w", now=T0)
        assert fail(session, job_id, "w", "x" * 5000, now=T0) is JobStatus.QUEUED
    with sessions.begin() as session:
        job = _job(session, job_id)
        assert _at(job.run_after) == T0 + 5 * SECOND
        assert (job.lease_owner, job.lease_expires_at) == (None, None)
        assert job.last_error == "x" * 4000
        assert (job.failure_reason, job.finished_at) == (None, None)
        assert job.image_data == b"\x89PNG"  # kept for the retry


@pytest.mark.parametrize(
    ("permanent", "max_attempts", "reason"),
    [(True, 5, FailureReason.INVALID_INPUT), (False, 1, FailureReason.ERROR)],
)
def test_a_failed_job_records_why_and_when(
    engine: Engine, permanent: bool, max_attempts: int, reason: str
) -> None:
    (job_id,) = _jobs(engine, max_attempts=max_attempts)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        claim(session, "w", now=T0)
        status = fail(session, job_id, "w", "bad", permanent=permanent, now=T0 + SECOND)
        assert status is JobStatus.FAILED
    with sessions.begin() as session:
        job = _job(session, job_id)
        assert job.failure_reason == reason and _at(job.finished_at) == T0 + SECOND
        assert (job.lease_owner, job.image_data, job.prompt) == (None, None, None)


def test_fail_by_anyone_but_the_owner_or_of_no_job_changes_nothing(engine: Engine) -> None:
    (job_id,) = _jobs(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        claim(session, "owner", now=T0)
    with sessions.begin() as session:
        assert fail(session, job_id, "intruder", "boom", now=T0) is None
        assert fail(session, job_id + 1000, "owner", "boom", now=T0) is None
    with sessions.begin() as session:
        job = _job(session, job_id)
        assert (job.status, job.lease_owner, job.last_error) == (JobStatus.RUNNING, "owner", None)


def test_fail_reads_the_job_as_it_is_now_not_as_the_session_last_saw_it(
    engine: Engine,
) -> None:
    (job_id,) = _jobs(engine)
    sessions = session_factory(engine)
    with sessions(expire_on_commit=False) as stale:
        seen = _job(stale, job_id)  # held: the session's identity map keeps this copy
        assert seen.status is JobStatus.QUEUED
        stale.commit()
        with sessions.begin() as other:  # claimed meanwhile by another session
            claim(other, "w", now=T0)
        assert fail(stale, job_id, "w", "boom", now=T0) is JobStatus.QUEUED
        assert seen.last_error == "boom"  # the same object, read afresh
        stale.commit()
    with sessions.begin() as session:
        assert _job(session, job_id).last_error == "boom"


# the reaper: requeue_expired and fail_abandoned


def test_requeue_expired_clears_the_lease_and_makes_the_job_due_now(engine: Engine) -> None:
    (job_id,) = _jobs(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        claim(session, "dies", lease_seconds=10, now=T0)
    with sessions.begin() as session:
        assert requeue_expired(session, T0 + 11 * SECOND) == 1
    with sessions.begin() as session:
        job = _job(session, job_id)
        assert (job.status, job.lease_owner, job.lease_expires_at) == (JobStatus.QUEUED, None, None)
        assert _at(job.run_after) == T0 + 11 * SECOND


def test_a_finished_job_is_never_reaped(engine: Engine) -> None:
    done, failed = _jobs(engine, 2, max_attempts=2)
    sessions = session_factory(engine)
    with sessions.begin() as session:  # both keep their (past) lease expiry
        claim(session, "w", lease_seconds=10, now=T0)
        claim(session, "w", lease_seconds=10, now=T0)
        assert complete(session, done, "w", now=T0 + SECOND)
        session.execute(update(Job).where(Job.id == failed).values(status=JobStatus.FAILED))
    later = T0 + timedelta(hours=1)
    with sessions.begin() as session:  # an attempt left: not requeued
        assert requeue_expired(session, later) == 0
        session.execute(update(Job).values(max_attempts=1))
    with sessions.begin() as session:  # none left: not failed again
        assert fail_abandoned(session, later) == []
    with sessions.begin() as session:
        assert _job(session, done).status is JobStatus.DONE
        assert _job(session, failed).status is JobStatus.FAILED


def test_fail_abandoned_reports_each_job_and_clears_it(engine: Engine) -> None:
    first, second = _jobs(engine, 2, max_attempts=1, model="m1")
    sessions = session_factory(engine)
    with sessions.begin() as session:
        claim(session, "dies", lease_seconds=10, now=T0)
        claim(session, "dies", lease_seconds=10, now=T0)
    with sessions.begin() as session:
        sample_ids = {job_id: _job(session, job_id).sample_id for job_id in (first, second)}
        failed = fail_abandoned(session, T0 + 11 * SECOND)
    assert sorted(failed, key=lambda f: f.job_id) == [
        FailedJob(job_id, sample_ids[job_id], "m1", 1) for job_id in (first, second)
    ]
    with sessions.begin() as session:
        for job_id in (first, second):
            job = _job(session, job_id)
            assert job.status is JobStatus.FAILED
            assert job.failure_reason == FailureReason.WORKER_CRASHED
            assert _at(job.finished_at) == T0 + 11 * SECOND
            assert (job.lease_owner, job.lease_expires_at) == (None, None)
            assert (job.image_data, job.prompt) == (None, None)
            sample = session.get(Sample, job.sample_id)
            assert sample is not None and sample.status is SampleStatus.FAILED


def test_fail_abandoned_works_in_batches_of_one_hundred(engine: Engine) -> None:
    job_ids = _jobs(engine, 101, max_attempts=1)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        session.execute(
            update(Job).values(
                status=JobStatus.RUNNING, attempts=1, lease_owner="dies", lease_expires_at=T0
            )
        )
    with sessions.begin() as session:
        assert len(fail_abandoned(session, T0 + SECOND)) == 100
    with sessions.begin() as session:
        assert len(fail_abandoned(session, T0 + SECOND)) == 1
        assert fail_abandoned(session, T0 + SECOND) == []
        statuses = session.execute(select(Job.status).where(Job.id.in_(job_ids))).scalars()
        assert set(statuses) == {JobStatus.FAILED}


def test_fail_abandoned_is_not_crowded_out_by_jobs_it_must_not_fail(engine: Engine) -> None:
    # a hundred jobs on their last attempt whose lease still runs, a hundred whose lease ran
    # out with an attempt left, then one abandoned job: the batch limit must not hide it
    leased = _jobs(engine, 100, max_attempts=1)
    retry = _jobs(engine, 100, max_attempts=2)
    (abandoned,) = _jobs(engine, 1, max_attempts=1)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        running = {"status": JobStatus.RUNNING, "attempts": 1, "lease_owner": "w"}
        session.execute(
            update(Job).where(Job.id.in_(leased)).values(lease_expires_at=T0 + SECOND, **running)
        )
        session.execute(
            update(Job)
            .where(Job.id.in_([*retry, abandoned]))
            .values(lease_expires_at=T0, **running)
        )
    with sessions.begin() as session:
        assert [f.job_id for f in fail_abandoned(session, T0 + MS)] == [abandoned]


# workers and depth


def test_a_first_heartbeat_records_the_worker(engine: Engine) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        beat(session, "w1", hostname="h" * 300, pid=7, job_id=3, now=T0)
    with sessions.begin() as session:
        row = session.get(WorkerRecord, "w1")
        assert row is not None and (row.hostname, row.pid, row.job_id) == ("h" * 255, 7, 3)
        assert _at(row.started_at) == T0 and _at(row.last_seen_at) == T0


def test_forgetting_workers_removes_only_those_meant(engine: Engine) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        for worker, seen in (("gone", T0), ("stale", T0), ("edge", T0 + SECOND), ("live", T0)):
            beat(session, worker, hostname="h", pid=1, now=seen)
        beat(session, "live", hostname="h", pid=1, now=T0 + 30 * SECOND)
    with sessions.begin() as session:
        forget_worker(session, "gone")
        # silent for more than 29 s at T0 + 30 s: seen before T0 + 1 s ("edge" is exactly at it)
        assert forget_stale_workers(session, older_than_seconds=29, now=T0 + 30 * SECOND) == 1
    with sessions.begin() as session:
        assert set(session.execute(select(WorkerRecord.id)).scalars()) == {"edge", "live"}


def test_depth_counts_waiting_and_running_jobs_and_the_oldest_wait(engine: Engine) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        empty = depth(session, T0)
        assert (empty.queued, empty.running, empty.oldest_age_seconds) == (0, 0, 0.0)
    old_done, old_running = _jobs(engine, 2, run_after=T0 - timedelta(hours=1))
    waiting = _jobs(engine, 2, run_after=T0)
    with sessions.begin() as session:
        claim(session, "w", now=T0)
        claim(session, "w", now=T0)
        assert complete(session, old_done, "w", now=T0)
        assert _job(session, old_running).status is JobStatus.RUNNING
    with sessions.begin() as session:
        now = T0 + 7 * SECOND
        counted = depth(session, now)
        assert (counted.queued, counted.running) == (len(waiting), 1)
        assert counted.oldest_age_seconds == 7.0  # the done and running jobs are older
        assert counted.live_workers == 0


def test_depth_counts_workers_seen_in_the_last_thirty_seconds_of_its_clock(
    engine: Engine,
) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:  # T0 is long past on the wall clock
        beat(session, "edge", hostname="h", pid=1, now=T0)
        beat(session, "old", hostname="h", pid=2, now=T0 - MS)
    with sessions.begin() as session:
        assert depth(session, T0 + 30 * SECOND).live_workers == 1


# races: another session acts between the queue's SELECT and its conditional UPDATE


def _between_select_and_update(engine: Engine, act: Callable[[], None]) -> list[bool]:
    """Run `act` (in another session) just before the next UPDATE of the jobs table."""
    fired: list[bool] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not fired and statement.lstrip().upper().startswith("UPDATE JOBS"):
            fired.append(True)
            act()

    event.listen(engine, "before_cursor_execute", before)
    return fired


def test_two_claims_racing_for_one_job_never_both_own_it(engine: Engine) -> None:
    (job_id,) = _jobs(engine)
    sessions = session_factory(engine)
    thief: list[Job | None] = []

    def steal() -> None:
        with sessions.begin() as other:
            job = claim(other, "thief", now=T0)
            thief.append(None if job is None else job)

    fired = _between_select_and_update(engine, steal)
    with sessions.begin() as session:
        mine = claim(session, "mine", now=T0)
    assert fired == [True] and len(thief) == 1
    # SQLite: the thief wins, the first claim's UPDATE finds the job taken and finds no other;
    # PostgreSQL: the first claim holds the row lock, the thief skips it
    owners = [job.lease_owner for job in (mine, thief[0]) if job is not None]
    assert len(owners) == 1
    with sessions.begin() as session:
        job = _job(session, job_id)
        assert (job.lease_owner, job.attempts) == (owners[0], 1)


def test_a_lease_extended_while_the_reaper_looks_is_not_failed(tmp_path: Path) -> None:
    # SQLite only: on PostgreSQL the reaper's SELECT locks the row, so the extension waits
    engine = make_engine(f"sqlite:///{tmp_path / 'race.db'}")
    (job_id,) = _jobs(engine, max_attempts=1)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        claim(session, "slow", lease_seconds=10, now=T0)
    later = T0 + 11 * SECOND

    def heartbeat() -> None:
        with sessions.begin() as other:
            assert extend(other, job_id, "slow", lease_seconds=10, now=later)

    fired = _between_select_and_update(engine, heartbeat)
    with sessions.begin() as session:
        assert fail_abandoned(session, later) == []
    assert fired == [True]
    with sessions.begin() as session:
        job = _job(session, job_id)
        assert (job.status, job.lease_owner) == (JobStatus.RUNNING, "slow")
    engine.dispose()


# PostgreSQL: a row locked by another session is skipped, not waited for


@pytest.fixture()
def postgres() -> Iterator[Engine]:
    with schema_url() as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


def _lock_job(session: Session, job_id: int) -> None:
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())


def _fail_fast(session: Session) -> None:
    session.execute(text("set local lock_timeout = '1s'"))


def test_claim_skips_a_job_another_session_has_locked(postgres: Engine) -> None:
    locked, free = _jobs(postgres, 2)
    sessions = session_factory(postgres)
    with sessions.begin() as holder:
        _lock_job(holder, locked)
        with sessions.begin() as session:
            _fail_fast(session)
            job = claim(session, "w", now=T0)
            assert job is not None and job.id == free


def test_fail_abandoned_skips_a_job_another_session_has_locked(postgres: Engine) -> None:
    locked, free = _jobs(postgres, 2, max_attempts=1)
    sessions = session_factory(postgres)
    with sessions.begin() as session:
        claim(session, "dies", lease_seconds=10, now=T0)
        claim(session, "dies", lease_seconds=10, now=T0)
    with sessions.begin() as holder:
        _lock_job(holder, locked)
        with sessions.begin() as session:
            _fail_fast(session)
            assert [f.job_id for f in fail_abandoned(session, T0 + 11 * SECOND)] == [free]
