"""What the worker decides, one decision at a time, on the real queue (SQLite) with the real
reference auditor and a clock the test sets: the claim and its lease, the heartbeat rows and
the lease's extension, how a failure is classified and counted, a lost lease, a release on
stop, the loop that outlives a broken database and removes its heartbeat row when stopped.

The auditor is the real one; where a test must act in the middle of an audit (look at the
database, steal the lease, release the job), `_During` runs that action just before the real
audit, and `_Failing` makes the audit raise a given error (a GPU out of memory, say), as a
real failure would.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from guardrail.logs import request_id_var, sample_id_var
from guardrail.service.api import create_app
from guardrail.service.auditor import ModelAuditor
from guardrail.service.otel import build_exporter
from guardrail.service.runtime import Runtime
from guardrail.service.worker import Worker
from storage import queue
from storage.models import Job, JobStatus, Sample, SampleStatus, VerdictRecord, WorkerRecord
from tests.guardrail.otlp_receiver import otlp_receiver
from tests.guardrail.test_service import AUTH, OUTPUT, _body, _runtime, _trap

# far from the machine's clock: a decision that reads the real time instead of the worker's
# clock sees every lease as unexpired and every timestamp off by years
T0 = datetime(2031, 5, 17, 9, 30, tzinfo=UTC)


class Clock:
    """The worker's notion of now, moved by the test."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class _During:
    """The real auditor, running `action` just before each audit (the audit is under way)."""

    def __init__(self, inner: ModelAuditor, action: Callable[[], None]) -> None:
        self.inner, self.action = inner, action
        self.settings = inner.settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def audit(self, *args: Any, **kwargs: Any) -> Any:
        self.action()
        return self.inner.audit(*args, **kwargs)


class _Failing(_During):
    """The real auditor whose audit raises `error` (after decoding the image, as a scorer
    that runs out of memory would)."""

    def __init__(self, inner: ModelAuditor, error: Exception) -> None:
        def fail() -> None:
            raise error

        super().__init__(inner, fail)


def _naive(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive UTC datetimes."""
    return None if moment is None else moment.replace(tzinfo=None)


def _submit(runtime: Runtime, n: int = 1, output: str = "knife .") -> list[str]:
    """`n` samples through the samples API (one word each, unless `output` says more: an
    audit's cost grows with its words)."""
    client = TestClient(create_app(runtime))
    _, image_b64 = _trap()
    ids = []
    for i in range(n):
        body = _body(image_b64, request_id=f"r-{i}", output=output)
        answer = client.post("/v1/samples", json=body, headers=AUTH)
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["id"])
    return ids


def _state(runtime: Runtime, sample_id: str) -> tuple[Job, SampleStatus, int]:
    """The sample's job, the sample's status and how many verdicts it has."""
    with runtime.sessions() as session:
        job = session.query(Job).filter(Job.sample_id == sample_id).one()
        sample = session.get(Sample, sample_id)
        assert sample is not None
        verdicts = session.query(VerdictRecord).count()
        session.expunge_all()
        return job, sample.status, verdicts


def _heartbeats(runtime: Runtime) -> list[tuple[str, int | None, datetime | None]]:
    with runtime.sessions() as session:
        rows = session.query(WorkerRecord).order_by(WorkerRecord.id).all()
        return [(r.id, r.job_id, _naive(r.last_seen_at)) for r in rows]


def _metric(runtime: Runtime, name: str, **labels: str) -> float:
    value = runtime.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _jobs_failed(runtime: Runtime, reason: str) -> float:
    return _metric(runtime, "guardrail_jobs_failed_total", model="reference", reason=reason)


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    """The worker's log lines at exactly `level`, in order."""
    records = caplog.records
    return [r.getMessage() for r in records if r.name == "guardrail.worker" and r.levelno == level]


def _worker(runtime: Runtime, auditors: Any = None, **kwargs: Any) -> Worker:
    kwargs.setdefault("clock", Clock())
    kwargs.setdefault("owner", "w-1")
    return Worker(runtime.sessions, auditors or runtime.auditors, runtime.metrics, **kwargs)


def test_an_empty_queue_is_no_work(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    worker = _worker(runtime)
    assert worker.run_once() is False
    assert (worker.current_job, worker.jobs_done) == (None, 0)
    assert _heartbeats(runtime) == []  # no claim, no heartbeat row


def test_a_claim_leases_the_job_from_the_clock_and_the_audit_completes_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _runtime(tmp_path)
    (sample_id,) = _submit(runtime, output=OUTPUT)
    clock = Clock()
    seen: dict[str, Any] = {}

    def look() -> None:  # mid-audit, from another session
        seen["job"], seen["status"], _ = _state(runtime, sample_id)
        seen["heartbeats"] = _heartbeats(runtime)
        seen["current"] = worker.current_job
        seen["context"] = (request_id_var.get(), sample_id_var.get())

    auditors = {name: _During(a, look) for name, a in runtime.auditors.items()}
    worker = _worker(runtime, auditors, lease_seconds=77.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="guardrail.worker"):
        assert worker.run_once() is True
    job = seen["job"]
    # the audit's log lines name its sample and the client's request id, and only its own
    assert seen["context"] == ("r-0", sample_id)
    assert (request_id_var.get(), sample_id_var.get()) == (None, None)
    assert (
        _messages(caplog, logging.INFO)[0] == f"worker w-1: auditing job {job.id} (model reference)"
    )
    assert (job.status, job.lease_owner, job.attempts) == (JobStatus.RUNNING, "w-1", 1)
    assert _naive(job.lease_expires_at) == _naive(T0 + timedelta(seconds=77))
    assert seen["status"] is SampleStatus.AUDITING
    assert seen["heartbeats"] == [("w-1", job.id, _naive(T0))]  # names the job from the claim
    assert seen["current"] == job.id
    # done: completed at the clock's time, the verdicts stored, counted once
    done, status, verdicts = _state(runtime, sample_id)
    assert (done.status, done.lease_owner, _naive(done.finished_at)) == (
        JobStatus.DONE,
        None,
        _naive(T0),
    )
    assert status is SampleStatus.AUDITED and verdicts == 4
    assert (worker.current_job, worker.jobs_done) == (None, 1)
    assert _metric(runtime, "guardrail_audits_total", model="reference") == 1
    assert _metric(runtime, "guardrail_audit_duration_seconds_count", model="reference") == 1
    assert _metric(runtime, "guardrail_audit_forward_passes_count", model="reference") == 1
    assert _metric(runtime, "guardrail_audit_forward_passes_sum", model="reference") > 0
    tokens = runtime.metrics.registry.get_sample_value
    words = {
        (category, verdict): tokens(
            "guardrail_tokens_audited_total",
            {"model": "reference", "verdict": verdict, "category": category},
        )
        for category, verdict in (
            ("fork", "borrowed_evidence"),
            ("knife", "grounded"),
        )
    }
    assert words == {("fork", "borrowed_evidence"): 1.0, ("knife", "grounded"): 1.0}
    assert _metric(runtime, "guardrail_audit_failures_total", model="reference") == 0
    assert worker.run_once() is False  # exactly one job


def test_the_verdicts_are_exported_after_the_commit_in_the_clients_trace(tmp_path: Path) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with otlp_receiver() as receiver:
        runtime = _runtime(tmp_path, otel_endpoint=receiver.url)
        (sample_id,) = _submit(runtime, output=OUTPUT)
        with runtime.sessions.begin() as session:  # as the proxy stores the client's header
            sample = session.get(Sample, sample_id)
            assert sample is not None
            sample.traceparent = f"00-{trace_id}-{parent_id}-01"
        exporter = build_exporter(runtime.settings, runtime.metrics)
        assert exporter is not None
        worker = _worker(runtime, exporter=exporter)
        assert worker.run_once() is True
        exporter.shutdown()  # flushes
    (span,) = receiver.spans
    assert span.attributes["guardrail.sample.id"] == sample_id
    assert (span.trace_id, span.parent_span_id) == (trace_id, parent_id)
    assert len(span.events) == 4  # one evaluation per word


def test_jobs_whose_workers_died_on_every_attempt_fail_before_the_next_claim(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _runtime(tmp_path)
    dead, alive = _submit(runtime, 2)
    with runtime.sessions.begin() as session:  # a worker claims `dead`'s job and dies, twice
        job = session.query(Job).filter(Job.sample_id == dead).one()
        job.max_attempts = 1
        session.flush()
        claimed = queue.claim(session, "ghost", lease_seconds=10, now=T0)
        assert claimed is not None and claimed.id == job.id
    clock = Clock(T0 + timedelta(seconds=9))  # its lease still runs: nothing to fail yet
    worker = _worker(runtime, clock=clock)
    with runtime.sessions.begin() as session:  # keep `alive` out of reach meanwhile
        session.query(Job).filter(Job.sample_id == alive).one().run_after = T0 + timedelta(hours=1)
    assert worker.run_once() is False
    assert _state(runtime, dead)[0].status is JobStatus.RUNNING
    clock.now = T0 + timedelta(seconds=11)  # the lease ran out, no attempt left
    with caplog.at_level(logging.WARNING, logger="guardrail.worker"):
        assert worker.run_once() is False  # failed, not claimed
    job, _, _ = _state(runtime, dead)
    assert _messages(caplog, logging.WARNING) == [
        f"worker w-1: job {job.id} (sample {dead}) failed: its worker died on each of 1 attempts"
    ]
    assert (job.status, job.failure_reason) == (
        JobStatus.FAILED,
        queue.FailureReason.WORKER_CRASHED,
    )
    crashed = queue.FailureReason.WORKER_CRASHED
    assert _jobs_failed(runtime, crashed) == 1
    clock.now = T0 + timedelta(hours=2)  # the other job is due: audited in the same call
    assert worker.run_once() is True
    assert _state(runtime, alive)[0].status is JobStatus.DONE
    assert _jobs_failed(runtime, crashed) == 1


def test_a_retryable_failure_goes_back_to_the_queue_after_the_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _runtime(tmp_path)
    (sample_id,) = _submit(runtime)
    failing = {
        n: _Failing(a, MemoryError("CUDA out of memory")) for n, a in runtime.auditors.items()
    }
    clock = Clock()
    worker = _worker(runtime, failing, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="guardrail.worker"):
        assert worker.run_once() is True  # it worked on a job: the loop does not sleep
    job, status, verdicts = _state(runtime, sample_id)
    # the error in one line, its traceback at debug level
    failed = f"worker w-1: job {job.id} failed: MemoryError: CUDA out of memory"
    assert _messages(caplog, logging.WARNING) == [failed]
    (trace,) = _messages(caplog, logging.DEBUG)
    assert trace.startswith("Traceback (most recent call last):")
    assert trace.rstrip().endswith("MemoryError: CUDA out of memory")
    assert (job.status, job.attempts, job.lease_owner) == (JobStatus.QUEUED, 1, None)
    assert _naive(job.run_after) == _naive(T0 + timedelta(seconds=5))  # the first backoff
    assert job.last_error == "MemoryError: CUDA out of memory"
    assert job.failure_reason is None and status is SampleStatus.AUDITING and verdicts == 0
    assert _metric(runtime, "guardrail_audit_failures_total", model="reference") == 1
    for reason in (queue.FailureReason.ERROR, queue.FailureReason.INVALID_INPUT):
        assert _jobs_failed(runtime, reason) == 0
    assert (worker.current_job, worker.jobs_done) == (None, 1)
    assert worker.run_once() is False  # not before its backoff
    # the last attempt fails the job for good, with reason `error`
    with runtime.sessions.begin() as session:
        session.query(Job).filter(Job.sample_id == sample_id).one().max_attempts = 2
    clock.now = T0 + timedelta(seconds=5)
    assert worker.run_once() is True
    job, status, _ = _state(runtime, sample_id)
    assert (job.status, job.attempts, job.failure_reason) == (
        JobStatus.FAILED,
        2,
        queue.FailureReason.ERROR,
    )
    assert _naive(job.finished_at) == _naive(T0 + timedelta(seconds=5))
    assert status is SampleStatus.FAILED
    error = queue.FailureReason.ERROR
    assert _jobs_failed(runtime, error) == 1
    assert _metric(runtime, "guardrail_audit_failures_total", model="reference") == 2
    assert (worker.current_job, worker.jobs_done) == (None, 2)  # each job counted once


def test_bad_input_fails_at_once_with_the_clocks_time(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    (sample_id,) = _submit(runtime)
    with runtime.sessions.begin() as session:  # a job without its image
        session.query(Job).one().image_data = None
    worker = _worker(runtime)
    assert worker.run_once() is True
    job, status, _ = _state(runtime, sample_id)
    assert (job.status, job.attempts, job.failure_reason) == (
        JobStatus.FAILED,
        1,
        queue.FailureReason.INVALID_INPUT,
    )
    assert job.last_error == "MissingImageError: the job carries no image"
    assert _naive(job.finished_at) == _naive(T0) and status is SampleStatus.FAILED
    invalid = queue.FailureReason.INVALID_INPUT
    assert _jobs_failed(runtime, invalid) == 1
    error = queue.FailureReason.ERROR
    assert _jobs_failed(runtime, error) == 0


def test_a_failure_after_the_lease_was_lost_is_not_recorded(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    (sample_id,) = _submit(runtime)
    clock = Clock()

    def steal() -> None:  # the lease runs out mid-audit and another worker takes the job
        clock.now = T0 + timedelta(seconds=61)
        with runtime.sessions.begin() as session:
            assert queue.claim(session, "thief", lease_seconds=60, now=clock.now) is not None
        raise MemoryError("CUDA out of memory")

    auditors = {n: _During(a, steal) for n, a in runtime.auditors.items()}
    worker = _worker(runtime, auditors, lease_seconds=60.0, clock=clock)
    assert worker.run_once() is True
    job, status, _ = _state(runtime, sample_id)
    assert (job.status, job.lease_owner, job.attempts) == (JobStatus.RUNNING, "thief", 2)
    assert job.last_error is None and status is SampleStatus.AUDITING
    for reason in (queue.FailureReason.ERROR, queue.FailureReason.INVALID_INPUT):
        assert _jobs_failed(runtime, reason) == 0


def test_a_result_after_the_lease_was_lost_is_thrown_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _runtime(tmp_path)
    (sample_id,) = _submit(runtime)
    clock = Clock()

    def steal() -> None:
        clock.now = T0 + timedelta(seconds=61)
        with runtime.sessions.begin() as session:
            assert queue.claim(session, "thief", lease_seconds=60, now=clock.now) is not None

    auditors = {n: _During(a, steal) for n, a in runtime.auditors.items()}
    worker = _worker(runtime, auditors, lease_seconds=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="guardrail.worker"):
        assert worker.run_once() is True
    job, status, verdicts = _state(runtime, sample_id)
    assert (job.status, job.lease_owner) == (JobStatus.RUNNING, "thief")
    assert status is SampleStatus.AUDITING and verdicts == 0  # nothing of the audit kept
    assert _metric(runtime, "guardrail_audits_total", model="reference") == 0
    assert any("lost the lease" in r.getMessage() for r in caplog.records)
    assert (worker.current_job, worker.jobs_done) == (None, 1)


def test_released_on_stop_the_job_goes_back_uncounted_and_the_late_result_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _runtime(tmp_path)
    (sample_id,) = _submit(runtime)
    clock = Clock()
    released: list[bool] = []

    def stop() -> None:
        clock.now = T0 + timedelta(seconds=3)
        released.append(worker.release_current())

    auditors = {n: _During(a, stop) for n, a in runtime.auditors.items()}
    worker = _worker(runtime, auditors, clock=clock)
    assert worker.release_current() is False  # nothing to release yet
    with caplog.at_level(logging.INFO, logger="guardrail.worker"):
        assert worker.run_once() is True
    assert released == [True]
    job, status, verdicts = _state(runtime, sample_id)
    assert f"worker w-1: released job {job.id}" in _messages(caplog, logging.INFO)
    assert (job.status, job.attempts, job.lease_owner) == (JobStatus.QUEUED, 0, None)
    assert _naive(job.run_after) == _naive(T0 + timedelta(seconds=3))
    assert status is SampleStatus.QUEUED and verdicts == 0
    assert _metric(runtime, "guardrail_audits_total", model="reference") == 0
    assert worker.release_current() is False  # and nothing after


class _Ticks:
    """The heartbeat's wait, stepped by the test instead of sleeping: each wait records the
    interval asked for and returns once the test `tick`s (the clock moved on by that interval)
    or the audit is over."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.intervals: list[float] = []
        self._ticked = 0
        self._changed = threading.Condition()

    def __call__(self, done: threading.Event, interval: float) -> bool:
        with self._changed:
            self.intervals.append(interval)
            self._changed.notify_all()
            waited = len(self.intervals)
            # `done` is set from the audit's thread, which cannot notify this condition
            while self._ticked < waited:
                if done.is_set():
                    return True
                self._changed.wait(0.05)
            return False

    def tick(self) -> None:
        """Let the pending wait run out, the clock moved on by its interval; returns when the
        heartbeat waits again (its extension, if any, committed)."""
        with self._changed:
            waits = len(self.intervals)
            assert waits == self._ticked + 1, "no wait pending"
            self.clock.now += timedelta(seconds=self.intervals[-1])
            self._ticked = waits
            self._changed.notify_all()
            assert self._changed.wait_for(lambda: len(self.intervals) > waits, timeout=30)

    def first(self) -> None:
        """Returns when the heartbeat waits for the first time."""
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.intervals) > 0, timeout=30)


@pytest.mark.parametrize(
    ("lease_seconds", "interval"),
    [(6.0, 2.0), (1.2, 0.5)],  # a third of the lease; at least half a second
)
def test_the_heartbeat_extends_the_lease_from_the_clock_every_third_of_it(
    tmp_path: Path, lease_seconds: float, interval: float
) -> None:
    """Each time the interval runs out (a third of the lease, not under 0.5 s) the lease is
    extended to the clock's now plus the lease, until the audit is over."""
    runtime = _runtime(tmp_path)
    (sample_id,) = _submit(runtime)
    clock = Clock()
    ticks = _Ticks(clock)
    leases: list[datetime | None] = []

    def lease() -> datetime | None:
        return _naive(_state(runtime, sample_id)[0].lease_expires_at)

    def step() -> None:  # mid-audit: two intervals run out
        ticks.first()
        leases.append(lease())
        ticks.tick()
        leases.append(lease())
        ticks.tick()
        leases.append(lease())

    auditors = {n: _During(a, step) for n, a in runtime.auditors.items()}
    worker = _worker(runtime, auditors, lease_seconds=lease_seconds, clock=clock, wait=ticks)
    assert worker.run_once() is True
    assert ticks.intervals == [interval] * 3  # the third wait ended with the audit
    assert leases == [
        _naive(T0 + timedelta(seconds=lease_seconds + k * interval)) for k in range(3)
    ]
    assert _state(runtime, sample_id)[0].status is JobStatus.DONE


def test_a_heartbeat_that_cannot_reach_the_queue_logs_it_and_beats_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _runtime(tmp_path)
    (sample_id,) = _submit(runtime)
    clock = Clock()
    ticks = _Ticks(clock)
    leases: list[datetime | None] = []

    def rename(old: str, new: str) -> None:
        with runtime.engine.begin() as connection:
            connection.exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")

    def step() -> None:  # the queue's table is gone for one interval, then back
        ticks.first()
        rename("jobs", "jobs_away")
        ticks.tick()  # the extension fails, and the heartbeat waits again
        rename("jobs_away", "jobs")
        ticks.tick()
        leases.append(_naive(_state(runtime, sample_id)[0].lease_expires_at))

    auditors = {n: _During(a, step) for n, a in runtime.auditors.items()}
    worker = _worker(runtime, auditors, lease_seconds=6.0, clock=clock, wait=ticks)
    with caplog.at_level(logging.WARNING, logger="guardrail.worker"):
        assert worker.run_once() is True
    job = _state(runtime, sample_id)[0]
    assert ticks.intervals == [2.0] * 3
    assert leases == [_naive(T0 + timedelta(seconds=4 + 6))]  # extended again after the gap
    assert job.status is JobStatus.DONE
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        f"worker w-1: could not extend the lease of job {job.id}"
    ]
    assert errors[0].exc_info is not None  # with the database's error


def test_the_loop_beats_while_it_runs_and_forgets_its_row_when_stopped(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    clock = Clock()
    during: list[list[tuple[str, int | None, datetime | None]]] = []

    def beat_mid_audit() -> None:  # the periodic beat, while auditing, names the job
        clock.now = T0 + timedelta(seconds=60)
        _wait(lambda: _heartbeats(runtime)[0][2] == _naive(clock.now), "a beat mid-audit")
        during.append(_heartbeats(runtime))

    auditors = {n: _During(a, beat_mid_audit) for n, a in runtime.auditors.items()}
    worker = _worker(runtime, auditors, clock=clock, poll_seconds=0.05, heartbeat_seconds=0.2)
    # not a daemon, as a worker process runs it (children.py): its heartbeat thread is one itself
    loop = threading.Thread(target=worker.run, daemon=False)
    loop.start()
    try:
        _wait(lambda: _heartbeats(runtime) == [("w-1", None, _naive(T0))], "an idle heartbeat")
        # its heartbeat thread is named after it and never holds up the interpreter's exit
        (alive,) = [t for t in threading.enumerate() if t.name == "alive-w-1"]
        assert alive.daemon
        clock.now = T0 + timedelta(seconds=30)  # beats again, every heartbeat_seconds
        _wait(lambda: _heartbeats(runtime) == [("w-1", None, _naive(clock.now))], "a second beat")
        (sample_id,) = _submit(runtime)
        _wait(lambda: _state(runtime, sample_id)[0].status is JobStatus.DONE, "the audit")
        job_id = _state(runtime, sample_id)[0].id
        assert during == [[("w-1", job_id, _naive(T0 + timedelta(seconds=60)))]]
        _wait(lambda: worker.jobs_done == 1, "the job to be counted")  # after its commit
    finally:
        worker.stop.set()
        loop.join(timeout=30)
    assert not loop.is_alive()
    assert _heartbeats(runtime) == []  # a clean stop: no longer counted as live


def test_the_loop_outlives_a_broken_database_and_polls_at_its_pace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _runtime(tmp_path)
    with runtime.engine.begin() as connection:  # the database loses its queue
        connection.exec_driver_sql("DROP TABLE jobs")
    worker = _worker(runtime, poll_seconds=0.25, heartbeat_seconds=60)
    loop = threading.Thread(target=worker.run, daemon=True)
    with caplog.at_level(logging.ERROR, logger="guardrail.worker"):
        loop.start()
        time.sleep(1.5)
        worker.stop.set()
        loop.join(timeout=10)
    assert not loop.is_alive()
    errors = [r for r in caplog.records if "queue error" in r.getMessage()]
    assert 2 <= len(errors) <= 8  # about one per poll_seconds, not a busy loop
    assert worker.jobs_done == 0


def test_a_worker_without_its_tables_logs_each_failure_and_still_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _runtime(tmp_path)
    with runtime.engine.begin() as connection:  # neither the queue nor the heartbeat rows
        connection.exec_driver_sql("DROP TABLE workers")
        connection.exec_driver_sql("DROP TABLE jobs")
    worker = _worker(runtime, poll_seconds=0.05, heartbeat_seconds=60)
    loop = threading.Thread(target=worker.run, daemon=True)
    with caplog.at_level(logging.WARNING, logger="guardrail.worker"):
        loop.start()
        try:
            # any error and warning (the texts are checked below: a wrong one fails at once)
            _wait(lambda: bool(_messages(caplog, logging.ERROR)), "a queue error")
            _wait(lambda: bool(_messages(caplog, logging.WARNING)), "a heartbeat warning")
        finally:
            worker.stop.set()
            loop.join(timeout=30)
    assert not loop.is_alive()
    assert set(_messages(caplog, logging.ERROR)) == {"worker w-1: queue error"}
    assert all(r.exc_info is not None for r in caplog.records if r.levelno == logging.ERROR)
    assert _messages(caplog, logging.WARNING) == [
        "worker w-1: could not record its heartbeat",  # once: the next beat is a minute away
        "worker w-1: could not remove its heartbeat row",
    ]


def _wait(condition: Callable[[], bool], what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
