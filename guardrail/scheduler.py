"""Scheduled work, run by exactly one process of a deployment (APScheduler 3.x).

Jobs: daily and weekly audit reports (cron), the hallucination spike check (every minute),
retention (delete what is older than `retention_days`, in batches) and the lease reaper.
Each is idempotent per period: a report is stored once per kind and period, an alert fires once
per episode (hysteresis: it resolves only when the rate falls below `spike_resolve_fraction` of
the threshold).  With PostgreSQL the scheduler runs in the process holding an advisory lock;
another replica takes over within `election_seconds` when the leader dies.  With SQLite it runs
in the `guardrail serve` process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Integer as _Int
from sqlalchemy import delete, func, select, text

from guardrail.reports import HALLUCINATED
from guardrail.runtime import Runtime
from storage.models import (
    Alert,
    FlaggedToken,
    Job,
    Report,
    Sample,
    VerdictRecord,
)

__all__ = [
    "LeaderElection",
    "Retained",
    "Scheduler",
    "check_spikes",
    "deliver_alert",
    "reap_leases",
    "retain",
]

log = logging.getLogger("guardrail.scheduler")
ADVISORY_LOCK_KEY = 0x6775617264  # "guard"


@dataclass(frozen=True, slots=True)
class Window:
    tokens: int
    hallucinated: int

    @property
    def rate(self) -> float:
        return self.hallucinated / self.tokens if self.tokens else 0.0


def _window(runtime: Runtime, model: str, since: datetime, until: datetime) -> Window:
    with runtime.sessions() as session:
        row = session.execute(
            select(
                func.count(VerdictRecord.id),
                func.coalesce(
                    func.sum(func.cast(VerdictRecord.label.in_(HALLUCINATED), type_=_Int)), 0
                ),
            )
            .join(FlaggedToken, FlaggedToken.id == VerdictRecord.token_pk)
            .join(Sample, Sample.id == FlaggedToken.sample_id)
            .where(Sample.model == model, Sample.received_at >= since, Sample.received_at < until)
        ).one()
    return Window(tokens=int(row[0]), hallucinated=int(row[1]))


def _top_objects(runtime: Runtime, model: str, since: datetime) -> list[list[Any]]:
    with runtime.sessions() as session:
        rows = session.execute(
            select(FlaggedToken.category, func.count())
            .join(VerdictRecord, VerdictRecord.token_pk == FlaggedToken.id)
            .join(Sample, Sample.id == FlaggedToken.sample_id)
            .where(
                Sample.model == model,
                Sample.received_at >= since,
                VerdictRecord.label.in_(HALLUCINATED),
            )
            .group_by(FlaggedToken.category)
            .order_by(func.count().desc())
            .limit(5)
        ).all()
    return [[c, int(n)] for c, n in rows]


def check_spikes(runtime: Runtime, now: datetime | None = None) -> list[Alert]:
    """Fire or resolve the spike alert of every model; returns the alerts that changed."""
    s = runtime.settings
    now = now or datetime.now(UTC)
    changed = []
    for model in s.models:
        start = now - timedelta(minutes=s.spike_window_minutes)
        short = _window(runtime, model.name, start, now)
        # the baseline is the period before the short window
        base = _window(runtime, model.name, now - timedelta(hours=s.spike_baseline_hours), start)
        threshold = max(s.spike_ratio * base.rate, s.spike_floor)
        with runtime.sessions.begin() as session:
            firing = session.execute(
                select(Alert).where(Alert.model == model.name, Alert.state == "firing")
            ).scalar_one_or_none()
            if firing is None and short.tokens >= s.spike_min_tokens and short.rate > threshold:
                alert = Alert(
                    model=model.name,
                    state="firing",
                    started_at=now,
                    rate=short.rate,
                    baseline=base.rate,
                    tokens=short.tokens,
                    details={
                        "window_minutes": s.spike_window_minutes,
                        "baseline_hours": s.spike_baseline_hours,
                        "threshold": threshold,
                        "top_objects": _top_objects(
                            runtime, model.name, now - timedelta(minutes=s.spike_window_minutes)
                        ),
                    },
                )
                session.add(alert)
                session.flush()
                changed.append(alert)
            elif firing is not None and short.rate < s.spike_resolve_fraction * firing.details.get(
                "threshold", threshold
            ):
                firing.state = "resolved"
                firing.resolved_at = now
                changed.append(firing)
    for alert in changed:
        if alert.state == "firing":
            _attach_report(runtime, alert.id, now)
            deliver_alert(runtime, alert.id)
    return changed


def _attach_report(runtime: Runtime, alert_id: int, now: datetime) -> None:
    """An audit report of the spike's baseline window, linked from the alert."""
    from guardrail.report_command import make_report

    s = runtime.settings
    since = now - timedelta(hours=s.spike_baseline_hours)
    try:
        report_id, _ = make_report(runtime, since, now, "spike")
    except Exception:
        log.exception("could not render the report for spike alert %s", alert_id)
        return
    with runtime.sessions.begin() as session:
        alert = session.get(Alert, alert_id)
        if alert is not None:
            alert.details = {**alert.details, "report_id": report_id}


def deliver_alert(
    runtime: Runtime, alert_id: int, *, attempts: int = 3, backoff: float = 1.0
) -> bool:
    """POST the alert to the webhook with retries; the outcome is recorded, never raised."""
    s = runtime.settings
    with runtime.sessions() as session:
        alert = session.get(Alert, alert_id)
        if alert is None or alert.delivered_at is not None or not s.webhook_url:
            return False
        body = {
            "alert": "GuardrailHallucinationSpike",
            "model": alert.model,
            "started_at": alert.started_at.isoformat(),
            "window_minutes": alert.details.get("window_minutes"),
            "rate": alert.rate,
            "baseline": alert.baseline,
            "threshold": alert.details.get("threshold"),
            "audited_tokens": alert.tokens,
            "top_objects": alert.details.get("top_objects", []),
            "report": f"{s.public_url.rstrip('/')}/reports/{alert.details.get('report_id')}",
        }
    error = None
    for attempt in range(1, attempts + 1):
        try:
            response = httpx.post(s.webhook_url, json=body, timeout=10)
            if response.status_code < 300:
                error = None
                break
            error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            time.sleep(backoff * 2 ** (attempt - 1))
    with runtime.sessions.begin() as session:
        alert = session.get(Alert, alert_id)
        assert alert is not None
        alert.delivery_attempts += attempt
        if error is None:
            alert.delivered_at = datetime.now(UTC)
            alert.delivery_error = None
        else:
            alert.delivery_error = error
            log.warning("spike alert %s not delivered: %s", alert_id, error)
    return error is None


@dataclass(frozen=True, kw_only=True, slots=True)
class Retained:
    """What one retention pass deleted (rows)."""

    samples: int
    reports: int
    alerts: int


def retain(runtime: Runtime, now: datetime | None = None, batch: int = 500) -> Retained:
    """Delete everything older than `retention_days`, in batches so the API is never locked
    out: samples (with their tokens, attributions, verdicts, jobs and raw media), reports whose
    period starts before the cutoff (they embed output texts and heatmaps of those samples) and
    alerts that started before it (their details name objects and link such reports).

    Raises:
        ValueError: `batch` is not positive.
    """
    if batch < 1:
        raise ValueError(f"batch must be positive, got: {batch}")
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=runtime.settings.retention_days)
    samples = 0
    while True:
        with runtime.sessions.begin() as session:
            ids = list(
                session.execute(
                    select(Sample.id).where(Sample.received_at < cutoff).limit(batch)
                ).scalars()
            )
            if not ids:
                break
            session.execute(delete(Job).where(Job.sample_id.in_(ids)))
            for sample in session.execute(select(Sample).where(Sample.id.in_(ids))).scalars():
                session.delete(sample)
        samples += len(ids)
    reports = _delete_in_batches(runtime, Report.id, Report.period_start < cutoff, batch)
    alerts = _delete_in_batches(runtime, Alert.id, Alert.started_at < cutoff, batch)
    if samples or reports or alerts:
        log.info(
            "retention deleted %d samples, %d reports and %d alerts from before %s",
            samples,
            reports,
            alerts,
            cutoff.isoformat(timespec="seconds"),
        )
    return Retained(samples=samples, reports=reports, alerts=alerts)


def _delete_in_batches(runtime: Runtime, key: Any, expired: Any, batch: int) -> int:
    """Delete the rows of `key`'s table matching `expired`, `batch` per transaction."""
    total = 0
    while True:
        with runtime.sessions.begin() as session:
            ids = list(session.execute(select(key).where(expired).limit(batch)).scalars())
            if not ids:
                return total
            session.execute(
                delete(key.class_).where(key.in_(ids)).execution_options(synchronize_session=False)
            )
        total += len(ids)


def reap_leases(runtime: Runtime, now: datetime | None = None) -> int:
    """Fail the jobs whose worker died on their last attempt (reason `worker_crashed`) and
    return the other expired ones to the queue; returns how many jobs moved.  Workers do the
    same before every claim; this keeps the queue honest while no worker runs."""
    from storage import queue

    now = now or datetime.now(UTC)
    with runtime.sessions.begin() as session:
        failed = queue.fail_abandoned(session, now)
        back = queue.requeue_expired(session, now)
        queue.forget_stale_workers(session, older_than_seconds=3600, now=now)
    for job in failed:
        runtime.metrics.jobs_failed.labels(
            model=job.model, reason=queue.FailureReason.WORKER_CRASHED
        ).inc()
    return len(failed) + back


class LeaderElection:
    """Holds a PostgreSQL advisory lock on a dedicated connection while leading; SQLite:
    always the leader (one `guardrail serve` process)."""

    def __init__(self, runtime: Runtime, key: int = ADVISORY_LOCK_KEY) -> None:
        self.runtime = runtime
        self.key = key
        self._connection: Any = None

    @property
    def postgres(self) -> bool:
        return self.runtime.engine.dialect.name == "postgresql"

    def try_lead(self) -> bool:
        if not self.postgres:
            return True
        if self._connection is not None:
            try:
                self._connection.execute(text("select 1"))
                return True
            except Exception:
                self._connection = None
        connection = self.runtime.engine.connect()
        got = bool(
            connection.execute(text("select pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
        )
        connection.commit()
        if got:
            self._connection = connection
        else:
            connection.close()
        return got

    def release(self) -> None:
        if self._connection is not None:
            try:
                self._connection.execute(text("select pg_advisory_unlock(:k)"), {"k": self.key})
                self._connection.commit()
            finally:
                self._connection.close()
                self._connection = None


class Scheduler:
    """Runs the scheduled jobs while this process is the leader."""

    def __init__(self, runtime: Runtime, *, election_seconds: float = 30.0) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger

        self.runtime = runtime
        self.election = LeaderElection(runtime)
        self.election_seconds = election_seconds
        self.scheduler = BackgroundScheduler(timezone="UTC")
        s = runtime.settings
        jobs = [
            (
                "report_daily",
                self._report_daily,
                CronTrigger.from_crontab(s.report_daily_cron, timezone="UTC"),
            ),
            (
                "report_weekly",
                self._report_weekly,
                CronTrigger.from_crontab(s.report_weekly_cron, timezone="UTC"),
            ),
        ]
        for name, fn, trigger in jobs:
            self.scheduler.add_job(
                self._guarded(name, fn),
                trigger,
                id=name,
                name=name,
                max_instances=1,
                coalesce=True,
            )
        # retention also runs as soon as the scheduler starts: a service restarted more often
        # than the period would otherwise never run it
        periodic: tuple[tuple[str, Any, float, bool], ...] = (
            ("spike_check", check_spikes, s.spike_check_seconds, False),
            ("retention", retain, 3600, True),
            ("lease_reaper", reap_leases, 60, False),
        )
        for name, fn, seconds, at_start in periodic:
            extra = {"next_run_time": datetime.now(UTC)} if at_start else {}
            self.scheduler.add_job(
                self._guarded(name, fn),
                "interval",
                seconds=seconds,
                id=name,
                name=name,
                max_instances=1,
                coalesce=True,
                **extra,
            )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._elect, name="scheduler-election", daemon=True)

    def _guarded(self, name: str, fn: Callable[[Runtime], object]) -> Callable[[], None]:
        """`fn(runtime)` run only while leading, its failures logged; named `name` (the
        scheduler's and the log's name for the job)."""

        def run() -> None:
            if not self.election.try_lead():
                return
            try:
                fn(self.runtime)
            except Exception:  # one failing job never stops the scheduler
                log.exception("scheduled job %s failed", name)

        # not functools.wraps: APScheduler checks the call against `__wrapped__`'s signature
        run.__name__ = run.__qualname__ = name
        return run

    @staticmethod
    def _period(days: int) -> tuple[datetime, datetime]:
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return today - timedelta(days=days), today

    def _report_daily(self, runtime: Runtime) -> None:
        from guardrail.report_command import make_report

        make_report(runtime, *self._period(1), "daily")

    def _report_weekly(self, runtime: Runtime) -> None:
        from guardrail.report_command import make_report

        make_report(runtime, *self._period(7), "weekly")

    def _elect(self) -> None:
        while not self._stop.wait(self.election_seconds):
            try:
                self.election.try_lead()
            except Exception:
                log.exception("leader election failed")

    def start(self) -> None:
        self.election.try_lead()
        self.scheduler.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.scheduler.shutdown(wait=False)
        self.election.release()
