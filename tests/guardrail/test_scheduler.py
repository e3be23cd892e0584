"""Spike alerts (once per episode, hysteresis, notified through the outbox), retention, the
lease reaper and leader election."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request

from guardrail.commands.report import make_report
from guardrail.config import load_settings
from guardrail.demo.background_server import BackgroundServer, closed_port
from guardrail.service.alert_delivery import AlertDeliverer
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.scheduler import (
    LeaderElection,
    Retained,
    Scheduler,
    check_spikes,
    reap_leases,
    retain,
)
from storage import queue
from storage.engine import upgrade
from storage.models import Alert, FlaggedToken, Job, JobStatus, Report, Sample, VerdictRecord

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _runtime(tmp_path: Path, **overrides: Any) -> Runtime:
    runtime = build_runtime(
        load_settings(environ={}, database_url=f"sqlite:///{tmp_path / 'g.db'}", **overrides)
    )
    upgrade(runtime.engine)
    return runtime


def _audited(
    runtime: Runtime,
    when: datetime,
    labels: list[str],
    word: str = "spoon",
    model: str = "reference",
) -> None:
    """A sample of `model` audited at `when` whose words got `labels` (no model needed)."""
    with runtime.sessions.begin() as session:
        sample = Sample(
            model=model,
            received_at=when,
            image_sha256="0" * 64,
            image_width=96,
            image_height=96,
            generated_text=" ".join([word] * len(labels)),
            token_ids=[],
            extra={},
        )
        for i, label in enumerate(labels):
            token = FlaggedToken(position=i, token_id=i, word=word, category=word)
            token.verdict = VerdictRecord(
                label=label, prior_score=0.0, hallucination_score=0.0, reason="", numbers={}
            )
            sample.tokens.append(token)
        session.add(sample)


def _baseline(runtime: Runtime) -> None:
    for minute in range(30, 360, 10):  # 6 hours at 5%: 19 grounded, 1 hallucinated
        _audited(runtime, NOW - timedelta(minutes=minute), ["grounded"] * 19 + ["language_prior"])


def _receiver() -> tuple[FastAPI, list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> dict[str, str]:
        received.append(await request.json())
        return {"ok": "yes"}

    return app, received


def test_a_spike_fires_once_is_delivered_and_resolves_with_hysteresis(tmp_path: Path) -> None:
    app, received = _receiver()
    with BackgroundServer(app) as url:
        runtime = _runtime(tmp_path, webhook_url=f"{url}/hook")
        _baseline(runtime)
        assert check_spikes(runtime, NOW) == []  # the baseline alone is quiet
        for minute in (2, 4, 6, 8):  # 40 words at 50% in the last 10 minutes
            _audited(
                runtime, NOW - timedelta(minutes=minute), ["grounded"] * 5 + ["language_prior"] * 5
            )
        fired = check_spikes(runtime, NOW)
        assert [a.state for a in fired] == ["firing"]
        assert check_spikes(runtime, NOW + timedelta(minutes=1)) == []  # once per episode
        deliverer = AlertDeliverer.for_runtime(runtime, clock=lambda: NOW + timedelta(hours=1))
        assert deliverer is not None
        assert deliverer.deliver_due() == 1
        assert len(received) == 1
        body = received[0]
        assert body["model"] == "reference" and body["rate"] == pytest.approx(0.5)
        assert body["baseline"] < 0.2 and body["top_objects"][0][0] == "spoon"
        assert "/reports/" in body["report"]
        with runtime.sessions() as session:
            alert = session.query(Alert).one()
            assert alert.delivered_at is not None and alert.delivery_attempts == 1
            assert session.query(Report).filter_by(kind="spike").count() == 1
        # 20% is under the 0.15 floor x2 threshold but above 70% of it: still firing
        later = NOW + timedelta(minutes=20)
        for minute in (2, 5, 8):
            _audited(
                runtime,
                later - timedelta(minutes=minute),
                ["grounded"] * 8 + ["language_prior"] * 2,
            )
        assert check_spikes(runtime, later) == []
        calm = NOW + timedelta(minutes=40)
        for minute in (2, 5, 8):
            _audited(runtime, calm - timedelta(minutes=minute), ["grounded"] * 10)
        resolved = check_spikes(runtime, calm)
        assert [a.state for a in resolved] == ["resolved"]
        assert deliverer.deliver_due() == 1
        assert [r["status"] for r in received] == ["firing", "resolved"]


def test_low_traffic_never_pages_and_a_failing_webhook_is_recorded(tmp_path: Path) -> None:
    with closed_port() as port:
        runtime = _runtime(tmp_path, webhook_url=f"http://127.0.0.1:{port}/nobody")
        _audited(runtime, NOW - timedelta(minutes=3), ["language_prior"] * 10)
        assert check_spikes(runtime, NOW) == []  # 10 words < spike_min_tokens
        _audited(runtime, NOW - timedelta(minutes=2), ["language_prior"] * 30)
        fired = check_spikes(runtime, NOW)
        assert len(fired) == 1
        deliverer = AlertDeliverer.for_runtime(runtime, clock=lambda: NOW)
        assert deliverer is not None and deliverer.deliver_due() == 1
        with runtime.sessions() as session:
            alert = session.query(Alert).one()
            assert alert.delivered_at is None and alert.delivery_attempts == 1
            assert "ConnectError" in (alert.delivery_error or "")


def test_retention_deletes_old_samples_in_batches_and_the_reaper_returns_leases(
    tmp_path: Path,
) -> None:
    runtime = _runtime(tmp_path, retention_days=7)
    for day in (1, 10, 20):
        _audited(runtime, NOW - timedelta(days=day), ["grounded"])
    with runtime.sessions.begin() as session:
        old = session.query(Sample).filter(Sample.received_at < NOW - timedelta(days=15)).one()
        queue.enqueue(session, old.id)
    assert retain(runtime, NOW, batch=1) == Retained(samples=2, reports=0, alerts=0)
    with runtime.sessions() as session:
        assert session.query(Sample).count() == 1
        assert session.query(FlaggedToken).count() == 1 and session.query(Job).count() == 0
        keep = session.query(Sample).one().id
    with runtime.sessions.begin() as session:
        queue.enqueue(session, keep)
        assert queue.claim(session, "dead", lease_seconds=1) is not None
    assert reap_leases(runtime, datetime.now(UTC) + timedelta(seconds=5)) == 1
    with runtime.sessions() as session:
        assert session.query(Job).one().status is JobStatus.QUEUED


def test_one_leader_on_postgresql_and_another_takes_over() -> None:
    from tests.postgres import POSTGRES_URL, require_postgres

    require_postgres()
    url = POSTGRES_URL
    key = int.from_bytes(os.urandom(4), "big")
    first = LeaderElection(build_runtime(load_settings(environ={}, database_url=url)), key=key)
    second = LeaderElection(build_runtime(load_settings(environ={}, database_url=url)), key=key)
    assert first.try_lead() and first.try_lead()
    assert not second.try_lead()
    first.release()  # the leader dies: its connection (and lock) goes away
    assert second.try_lead()
    assert not first.try_lead()
    second.release()


def test_a_leader_whose_backend_is_terminated_loses_the_lead_to_another() -> None:
    # a real lost connection, not a graceful release(): PostgreSQL frees the advisory lock
    # when the backend ends, the follower's next election takes it, and the old leader (whose
    # next query fails) does not come back while the new one holds it
    from sqlalchemy import text

    from tests.postgres import POSTGRES_URL, require_postgres

    require_postgres()
    key = int.from_bytes(os.urandom(4), "big")
    first = LeaderElection(
        build_runtime(load_settings(environ={}, database_url=POSTGRES_URL)), key=key
    )
    second = LeaderElection(
        build_runtime(load_settings(environ={}, database_url=POSTGRES_URL)), key=key
    )
    admin = build_runtime(load_settings(environ={}, database_url=POSTGRES_URL)).engine
    try:
        assert first.try_lead() and not second.try_lead()
        pid = first.lock.connection.execute(text("select pg_backend_pid()")).scalar()
        with admin.connect() as connection:
            assert connection.execute(text("select pg_terminate_backend(:p)"), {"p": pid}).scalar()
        terminated = time.monotonic()
        while not second.try_lead():  # the follower polls as the election thread does
            assert time.monotonic() - terminated < 10, "nobody took the lead"
            time.sleep(0.01)
        takeover = time.monotonic() - terminated
        assert not first.try_lead()  # its dead connection noticed, the lock held by second
        assert first.lock.connection is None
        # a leader stopped after its backend died: release() does not raise
        first.lock.connection = first.runtime.engine.connect()
        pid = first.lock.connection.execute(text("select pg_backend_pid()")).scalar()
        with admin.connect() as connection:
            connection.execute(text("select pg_terminate_backend(:p)"), {"p": pid})
        first.release()
        assert first.lock.connection is None
        print(f"takeover {takeover * 1000:.0f} ms after pg_terminate_backend")
        second.release()
        assert first.try_lead()  # and it may lead again once the lock is free
        first.release()
    finally:
        second.release()
        first.release()
        admin.dispose()


def _alert(runtime: Runtime, started_at: datetime, word: str) -> None:
    with runtime.sessions.begin() as session:
        session.add(
            Alert(
                model="reference",
                state="resolved",
                started_at=started_at,
                resolved_at=started_at + timedelta(minutes=30),
                rate=0.5,
                baseline=0.05,
                tokens=40,
                details={"top_objects": [[word, 7]], "report_id": "r"},
            )
        )


def _contents(runtime: Runtime) -> str:
    """Every report's html and data and every alert's details, as one text."""
    with runtime.sessions() as session:
        reports = [f"{r.html}{r.data}" for r in session.query(Report)]
        alerts = [str(a.details) for a in session.query(Alert)]
    return "\n".join(reports + alerts)


def test_retention_deletes_expired_reports_and_alerts_with_their_content(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, retention_days=7)
    old, new = NOW - timedelta(days=10), NOW - timedelta(hours=2)
    _audited(runtime, old, ["language_prior"] * 3, word="zeppelin")
    _audited(runtime, new, ["language_prior"] * 3, word="teacup")
    make_report(runtime, old - timedelta(hours=1), old + timedelta(hours=1), "daily")
    # a weekly report whose period straddles the cutoff still holds an expired sample
    make_report(runtime, NOW - timedelta(days=12), NOW - timedelta(days=5), "weekly")
    make_report(runtime, new - timedelta(hours=1), new + timedelta(hours=1), "daily")
    _alert(runtime, old, "zeppelin")
    _alert(runtime, new, "teacup")
    with runtime.sessions() as session:  # the reports embed the samples' output texts
        htmls = [r.html for r in session.query(Report).order_by(Report.period_start)]
    assert ["zeppelin" in h for h in htmls] == [True, True, False]
    assert "teacup" in htmls[2]
    with pytest.raises(ValueError, match="batch must be positive, got: 0"):
        retain(runtime, NOW, batch=0)

    assert retain(runtime, NOW, batch=1) == Retained(samples=1, reports=2, alerts=1)

    assert "zeppelin" not in _contents(runtime) and "teacup" in _contents(runtime)
    with runtime.sessions() as session:
        assert "teacup" in session.query(Report).one().html
        assert session.query(Alert).one().details["top_objects"] == [["teacup", 7]]
        assert session.query(Sample).one().generated_text.startswith("teacup")
    assert retain(runtime, NOW) == Retained(samples=0, reports=0, alerts=0)  # idempotent


def test_retention_runs_when_the_scheduler_starts(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, retention_days=7)
    now = datetime.now(UTC)
    _audited(runtime, now - timedelta(days=9), ["grounded"], word="zeppelin")
    make_report(runtime, now - timedelta(days=9, hours=1), now - timedelta(days=8), "daily")
    _alert(runtime, now - timedelta(days=9), "zeppelin")
    scheduler = Scheduler(runtime, election_seconds=60)
    scheduler.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "zeppelin" in _contents(runtime):
            time.sleep(0.05)
    finally:
        scheduler.stop()
    assert "zeppelin" not in _contents(runtime)
    with runtime.sessions() as session:
        assert session.query(Sample).count() == session.query(Report).count() == 0
        assert session.query(Alert).count() == 0


def test_the_scheduler_starts_with_every_named_job_and_stops(tmp_path: Path) -> None:
    scheduler = Scheduler(_runtime(tmp_path), election_seconds=0.1)
    scheduler.start()
    try:
        jobs = scheduler.scheduler.get_jobs()
        ids = {job.id for job in jobs}
        assert ids == {"report_daily", "report_weekly", "spike_check", "retention", "lease_reaper"}
        # the scheduler's log lines and failures name the job, not `_guarded.<locals>.run`
        assert all(job.name == job.id and job.func.__qualname__ == job.id for job in jobs)
        # retention runs at start (tested above), the frequent checks on their schedule
        soon = datetime.now(UTC) + timedelta(seconds=30)
        assert all(
            job.next_run_time > soon for job in jobs if job.id in ("spike_check", "lease_reaper")
        )
    finally:
        scheduler.stop()
