"""Retention at its cutoff, with the clock passed in: what is exactly `retention_days` old is
kept, anything older goes, in batches of any size, and the pass says what it deleted."""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from guardrail.config import load_settings
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.scheduler import Retained, retain
from storage import queue
from storage.engine import upgrade
from storage.models import Alert, Job, Report, Sample

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)


def _runtime(tmp_path: Path, **overrides: float) -> Runtime:
    runtime = build_runtime(
        load_settings(environ={}, database_url=f"sqlite:///{tmp_path / 'g.db'}", **overrides)
    )
    upgrade(runtime.engine)
    return runtime


def _rows(runtime: Runtime, cutoff: datetime) -> None:
    """A sample (with a job), a report and an alert at the cutoff and one just before it."""
    with runtime.sessions.begin() as session:
        for when, name in ((cutoff, "kept"), (cutoff - US, "gone")):
            sample = Sample(
                model="reference",
                received_at=when,
                image_sha256="0" * 64,
                image_width=96,
                image_height=96,
                generated_text=name,
                token_ids=[],
                extra={},
            )
            session.add(sample)
            session.flush()
            queue.enqueue(session, sample.id)
            session.add(Report(kind=name, period_start=when, period_end=NOW, html=name, data={}))
            session.add(
                Alert(
                    model=name,
                    state="resolved",
                    started_at=when,
                    rate=0.5,
                    baseline=0.1,
                    tokens=40,
                    details={},
                )
            )


def _left(runtime: Runtime) -> tuple[list[str], list[str], list[str], int]:
    with runtime.sessions() as session:
        return (
            [s.generated_text for s in session.query(Sample)],
            [r.kind for r in session.query(Report)],
            [a.model for a in session.query(Alert)],
            session.query(Job).count(),
        )


def test_what_is_exactly_thirty_days_old_is_kept_by_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _runtime(tmp_path)
    _rows(runtime, NOW - timedelta(days=30))
    with caplog.at_level(logging.INFO, logger="guardrail.scheduler"):
        assert retain(runtime, NOW) == Retained(samples=1, reports=1, alerts=1)
    assert _left(runtime) == (["kept"], ["kept"], ["kept"], 1)
    assert (
        "retention deleted 1 samples, 1 reports and 1 alerts from before 2026-10-29T12:00:00+00:00"
        in caplog.messages
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="guardrail.scheduler"):
        assert retain(runtime, NOW) == Retained(samples=0, reports=0, alerts=0)
    # nothing deleted, nothing said (other loggers, e.g. alembic's, may speak when an earlier
    # test has lowered the root level)
    assert [r for r in caplog.records if r.name == "guardrail.scheduler"] == []


@pytest.mark.parametrize("only", ["samples", "reports", "alerts"])
def test_a_pass_that_deletes_one_kind_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, only: str
) -> None:
    runtime = _runtime(tmp_path, retention_days=2)
    _rows(runtime, NOW - timedelta(days=3))
    with runtime.sessions.begin() as session:  # keep one kind of expired row only
        for model in (Sample, Report, Alert):
            if model.__tablename__ != only:
                session.query(model).delete()
    with caplog.at_level(logging.INFO, logger="guardrail.scheduler"):
        retained = retain(runtime, NOW)
    assert getattr(retained, only) == 2
    said = [r.getMessage() for r in caplog.records if r.name == "guardrail.scheduler"]
    assert len(said) == 1 and said[0].startswith("retention deleted")


@pytest.mark.parametrize("batch", [1, 2, 3, 500])
def test_every_expired_row_goes_whatever_the_batch(tmp_path: Path, batch: int) -> None:
    runtime = _runtime(tmp_path, retention_days=2)
    for day in range(3, 8):  # ten expired rows of each kind, and two recent ones
        _rows(runtime, NOW - timedelta(days=day))
    _rows(runtime, NOW - timedelta(days=1))
    assert retain(runtime, NOW, batch=batch) == Retained(samples=10, reports=10, alerts=10)
    samples, reports, alerts, jobs = _left(runtime)
    assert (len(samples), len(reports), len(alerts), jobs) == (2, 2, 2, 2)


def test_each_transaction_deletes_at_most_one_batch(tmp_path: Path) -> None:
    # the API must never wait for one long delete: ten expired rows of each kind in batches of
    # three take four transactions each, and a fifth that finds nothing left
    runtime = _runtime(tmp_path, retention_days=2)
    for day in range(3, 8):
        _rows(runtime, NOW - timedelta(days=day))
    lookups: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        words = statement.split()
        if words[:2] in (
            ["SELECT", "samples.id"],
            ["SELECT", "reports.id"],
            ["SELECT", "alerts.id"],
        ):
            assert "LIMIT" in statement
            lookups.append(words[1])

    event.listen(runtime.engine, "before_cursor_execute", before)
    assert retain(runtime, NOW, batch=3) == Retained(samples=10, reports=10, alerts=10)
    assert lookups == ["samples.id"] * 5 + ["reports.id"] * 5 + ["alerts.id"] * 5


def test_without_a_clock_retention_reads_utc_whatever_the_local_zone(tmp_path: Path) -> None:
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Pacific/Honolulu"  # ten hours behind UTC
    time.tzset()
    try:
        runtime = _runtime(tmp_path, retention_days=30)
        _rows(runtime, datetime.now(UTC) - timedelta(days=30, hours=1))  # expired for an hour
        assert retain(runtime) == Retained(samples=2, reports=2, alerts=2)
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()
