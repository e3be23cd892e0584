"""The alert outbox: one row per webhook notification, claimed with a lease, like a job.

Functions take a session and never commit: the spike check writes a notification in the
transaction that changes its alert, so a state change is never lost between the database and
the webhook.  A claim is a conditional UPDATE (the row must still be claimable), and on
PostgreSQL the candidate is selected `FOR UPDATE SKIP LOCKED`, so two deliverers (two scheduler
processes, or one restarted while the old one's claim is live) never send the same row at the
same time.  Every claim counts an attempt: a deliverer that dies mid-send leaves a lease that
runs out, and the row is claimable again until its attempts are spent.  Delivery is at least
once (a deliverer that dies after the receiver answered and before it recorded the answer
sends again): receivers deduplicate on the notification id.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from storage.models import AlertNotification, utcnow

__all__ = [
    "GiveUpReason",
    "OutboxDepth",
    "Status",
    "add",
    "claim",
    "depth",
    "give_up",
    "give_up_stale",
    "mark_delivered",
    "retry_at",
]


class Status:
    """The `alert_notifications.status` values."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class GiveUpReason:
    """Why a notification ended FAILED (`failure_reason` and the metric's `outcome`)."""

    REJECTED = "rejected"  # the receiver refused it (4xx other than 408/429): retrying cannot help
    EXHAUSTED = "exhausted"  # every attempt failed
    EXPIRED = "expired"  # older than the age limit: a stale page helps nobody


@dataclass(frozen=True, slots=True)
class OutboxDepth:
    pending: int
    oldest_age_seconds: float


def add(
    session: Session, alert_id: int, event: str, *, now: datetime | None = None
) -> AlertNotification:
    """A pending notification of `event` (`firing` or `resolved`) for `alert_id`, due now.

    Raises:
        ValueError: `event` is neither.
    """
    if event not in ("firing", "resolved"):
        raise ValueError(f"event must be 'firing' or 'resolved', got: {event!r}")
    now = now or utcnow()
    row = AlertNotification(
        alert_id=alert_id,
        event=event,
        status=Status.PENDING,
        attempts=0,
        run_after=now,
        created_at=now,
    )
    session.add(row)
    session.flush()
    return row


def _unleased(now: datetime) -> ColumnElement[bool]:
    return or_(
        AlertNotification.lease_expires_at.is_(None), AlertNotification.lease_expires_at < now
    )


def _claimable(now: datetime, max_attempts: int) -> ColumnElement[bool]:
    return and_(
        AlertNotification.status == Status.PENDING,
        AlertNotification.run_after <= now,
        AlertNotification.attempts < max_attempts,
        _unleased(now),
    )


def claim(
    session: Session,
    owner: str,
    *,
    max_attempts: int,
    lease_seconds: float,
    now: datetime | None = None,
) -> AlertNotification | None:
    """Claim the oldest due notification for `owner` (counting an attempt), or None."""
    now = now or utcnow()
    postgres = session.get_bind().dialect.name == "postgresql"
    for _ in range(8):  # another deliverer may win the race for a candidate: try the next one
        query = (
            select(AlertNotification.id)
            .where(_claimable(now, max_attempts))
            .order_by(AlertNotification.run_after, AlertNotification.id)
            .limit(1)
        )
        if postgres:
            query = query.with_for_update(skip_locked=True)
        row_id = session.execute(query).scalar_one_or_none()
        if row_id is None:
            return None
        result = session.execute(
            update(AlertNotification)
            .where(AlertNotification.id == row_id, _claimable(now, max_attempts))
            .values(
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=AlertNotification.attempts + 1,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return session.get(AlertNotification, row_id, populate_existing=True)
    return None


def _owned(row_id: int, owner: str) -> ColumnElement[bool]:
    return and_(
        AlertNotification.id == row_id,
        AlertNotification.lease_owner == owner,
        AlertNotification.status == Status.PENDING,
    )


def _finish(session: Session, row_id: int, owner: str, **values: object) -> bool:
    result = session.execute(
        update(AlertNotification)
        .where(_owned(row_id, owner))
        .values(lease_owner=None, lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def mark_delivered(
    session: Session, row_id: int, owner: str, *, status_code: int, now: datetime | None = None
) -> bool:
    """The receiver took it; False if `owner` no longer held the row."""
    return _finish(
        session,
        row_id,
        owner,
        status=Status.DELIVERED,
        finished_at=now or utcnow(),
        last_status_code=status_code,
        last_error=None,
    )


def retry_at(
    session: Session,
    row_id: int,
    owner: str,
    when: datetime,
    *,
    error: str,
    status_code: int | None = None,
) -> bool:
    """A failed attempt: due again at `when`; False if `owner` no longer held the row."""
    return _finish(
        session,
        row_id,
        owner,
        run_after=when,
        last_error=error[:4000],
        last_status_code=status_code,
    )


def give_up(
    session: Session,
    row_id: int,
    owner: str,
    reason: str,
    *,
    error: str,
    status_code: int | None = None,
    now: datetime | None = None,
) -> bool:
    """End the row FAILED with `reason` (a `GiveUpReason`) and the last error."""
    return _finish(
        session,
        row_id,
        owner,
        status=Status.FAILED,
        failure_reason=reason,
        finished_at=now or utcnow(),
        last_error=error[:4000],
        last_status_code=status_code,
    )


def give_up_stale(
    session: Session, *, max_attempts: int, max_age_seconds: float, now: datetime | None = None
) -> list[tuple[int, str]]:
    """Fail the unleased pending rows older than `max_age_seconds` (`expired`) and those whose
    deliverer died on their last attempt (`exhausted`); returns (id, reason) of each."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=max_age_seconds)
    out: list[tuple[int, str]] = []
    for reason, stale in (
        (GiveUpReason.EXPIRED, AlertNotification.created_at < cutoff),
        (GiveUpReason.EXHAUSTED, AlertNotification.attempts >= max_attempts),
    ):
        where = and_(AlertNotification.status == Status.PENDING, _unleased(now), stale)
        query = select(AlertNotification.id).where(where).limit(100)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        for row_id in session.execute(query).scalars().all():
            result = session.execute(
                update(AlertNotification)
                .where(AlertNotification.id == row_id, where)
                .values(
                    status=Status.FAILED,
                    failure_reason=reason,
                    finished_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                    last_error=func.coalesce(AlertNotification.last_error, "")
                    + f" (given up: {reason})",
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                out.append((int(row_id), reason))
    return out


def depth(session: Session, now: datetime | None = None) -> OutboxDepth:
    """Notifications not yet delivered nor given up, and the age of the oldest."""
    now = now or utcnow()
    count, oldest = session.execute(
        select(func.count(), func.min(AlertNotification.created_at)).where(
            AlertNotification.status == Status.PENDING
        )
    ).one()
    if oldest is not None and oldest.tzinfo is None:  # SQLite drops the zone
        oldest = oldest.replace(tzinfo=now.tzinfo)
    age = (now - oldest).total_seconds() if oldest is not None else 0.0
    return OutboxDepth(pending=int(count), oldest_age_seconds=max(0.0, age))
