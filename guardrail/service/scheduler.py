"""Scheduled work, run by exactly one process of a deployment (APScheduler 3.x).

Jobs: daily and weekly audit reports (cron), the hallucination spike check (every minute),
retention (delete what is older than `retention_days`, in batches) and the lease reaper; beside
them, in every scheduler process (leader or not: leases keep two from sending the same row),
a thread delivers the alert outbox to the webhook (`guardrail.service.alert_delivery`).
Each is idempotent per period: a report is stored once per kind and period, an alert fires once
per episode (hysteresis: it resolves only when the rate falls below `spike_resolve_fraction` of
the threshold).  With PostgreSQL the scheduler runs in the process holding an advisory lock;
another replica takes over within `election_seconds` when the leader dies.  With SQLite it runs
in the `guardrail serve` process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from guardrail.service.alert_delivery import AlertDeliverer
from guardrail.service.runtime import Runtime
from storage import outbox, reads, repositories, retention
from storage.leadership import AdvisoryLock
from storage.models import Alert

__all__ = [
    "LeaderElection",
    "Retained",
    "Scheduler",
    "check_spikes",
    "reap_leases",
    "retain",
]

log = logging.getLogger("guardrail.scheduler")
ADVISORY_LOCK_KEY = 0x6775617264  # "guard"


def check_spikes(runtime: Runtime, now: datetime | None = None) -> list[Alert]:
    """Fire or resolve the spike alert of every model; returns the alerts that changed.

    With a `webhook_url`, each change writes its notification to the alert outbox in the same
    transaction (`firing`, and `resolved` with `webhook_send_resolved`); an `AlertDeliverer`
    sends them, never this check.  A firing alert's report is rendered first, so that its
    notification links it."""
    s = runtime.settings
    now = now or datetime.now(UTC)
    changed = []
    for model in s.models:
        start = now - timedelta(minutes=s.spike_window_minutes)
        baseline_start = now - timedelta(hours=s.spike_baseline_hours)
        with runtime.sessions() as session:
            short = reads.window_counts(session, model.name, start, now)
            # the baseline is the period before the short window
            base = reads.window_counts(session, model.name, baseline_start, start)
            firing_id = reads.firing_alert_id(session, model.name)
        threshold = max(s.spike_ratio * base.rate, s.spike_floor)
        fires = short.words >= s.spike_min_tokens and short.rate > threshold
        report_id = None
        if fires and firing_id is None:
            report_id = _spike_report(runtime, model.name, now)
        with runtime.sessions.begin() as session:
            firing = repositories.firing_alert(session, model.name)
            if firing is None and fires:
                top = reads.hallucinated_categories(session, model.name, start)
                alert = Alert(
                    model=model.name,
                    state="firing",
                    started_at=now,
                    rate=short.rate,
                    baseline=base.rate,
                    tokens=short.words,
                    details={
                        "window_minutes": s.spike_window_minutes,
                        "baseline_hours": s.spike_baseline_hours,
                        "threshold": threshold,
                        "top_objects": [[category, n] for category, n in top],
                        **({"report_id": report_id} if report_id else {}),
                    },
                )
                session.add(alert)
                session.flush()
                if s.webhook_url:
                    outbox.add(session, alert.id, "firing", now=now)
                changed.append(alert)
            elif firing is not None and short.rate < s.spike_resolve_fraction * firing.details.get(
                "threshold", threshold
            ):
                firing.state = "resolved"
                firing.resolved_at = now
                firing.details = {**firing.details, "resolved_rate": short.rate}
                if s.webhook_url and s.webhook_send_resolved:
                    outbox.add(session, firing.id, "resolved", now=now)
                changed.append(firing)
    return changed


def _spike_report(runtime: Runtime, model: str, now: datetime) -> str | None:
    """An audit report of the spike's baseline window, linked from the alert; None (logged)
    when it cannot be rendered: the alert fires anyway."""
    from guardrail.commands.report import make_report

    s = runtime.settings
    since = now - timedelta(hours=s.spike_baseline_hours)
    try:
        report_id, _ = make_report(runtime, since, now, "spike")
    except Exception:
        log.exception("could not render the report for the spike alert of %s", model)
        return None
    return report_id


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
    samples = _in_batches(runtime, retention.delete_samples_before, cutoff, batch)
    reports = _in_batches(runtime, retention.delete_reports_before, cutoff, batch)
    alerts = _in_batches(runtime, retention.delete_alerts_before, cutoff, batch)
    if samples or reports or alerts:
        log.info(
            "retention deleted %d samples, %d reports and %d alerts from before %s",
            samples,
            reports,
            alerts,
            cutoff.isoformat(timespec="seconds"),
        )
    return Retained(samples=samples, reports=reports, alerts=alerts)


def _in_batches(
    runtime: Runtime, delete_batch: Callable[..., int], cutoff: datetime, batch: int
) -> int:
    """Call `delete_batch` (one of `storage.retention`'s) one transaction per batch until it
    finds nothing left; returns the rows deleted."""
    total = 0
    while True:
        with runtime.sessions.begin() as session:
            deleted = delete_batch(session, cutoff, batch=batch)
        if not deleted:
            return total
        total += deleted


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
    """Holds a PostgreSQL advisory lock (`storage.leadership.AdvisoryLock`) on a dedicated
    connection while leading; SQLite: always the leader (one `guardrail serve` process)."""

    def __init__(self, runtime: Runtime, key: int = ADVISORY_LOCK_KEY) -> None:
        self.runtime = runtime
        self.key = key
        self.lock = AdvisoryLock(runtime.engine, key)

    @property
    def postgres(self) -> bool:
        return self.runtime.engine.dialect.name == "postgresql"

    def try_lead(self) -> bool:
        """True while this process leads; a lost connection is noticed and elects again."""
        if not self.postgres:
            return True
        return self.lock.try_hold()

    def release(self) -> None:
        """Stop leading; never raises on a dead connection (it logs)."""
        self.lock.release()


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
            ("spike_check", self._check_spikes, s.spike_check_seconds, False),
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
        self.deliverer = AlertDeliverer.for_runtime(runtime)
        self._delivery: threading.Thread | None = None
        if self.deliverer is not None:
            self._delivery = threading.Thread(
                target=self.deliverer.run, args=(self._stop,), name="alert-delivery", daemon=True
            )

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

    def _check_spikes(self, runtime: Runtime) -> None:
        if check_spikes(runtime) and self.deliverer is not None:
            self.deliverer.wake.set()  # deliver now, not at the next poll

    @staticmethod
    def _period(days: int) -> tuple[datetime, datetime]:
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return today - timedelta(days=days), today

    def _report_daily(self, runtime: Runtime) -> None:
        from guardrail.commands.report import make_report

        make_report(runtime, *self._period(1), "daily")

    def _report_weekly(self, runtime: Runtime) -> None:
        from guardrail.commands.report import make_report

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
        if self._delivery is not None:
            self._delivery.start()

    def stop(self) -> None:
        self._stop.set()
        self.scheduler.shutdown(wait=False)
        if self.deliverer is not None and self._delivery is not None:
            self.deliverer.wake.set()
            # an attempt in flight ends within its timeout; its lease covers it otherwise
            self._delivery.join(timeout=self.deliverer.policy.timeout_seconds + 5)
            self.deliverer.close()
        self.election.release()
