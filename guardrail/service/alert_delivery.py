"""`AlertDeliverer`: sends the alert outbox (storage.outbox) to the webhook.

It runs beside the spike check, never inside it (a slow or dead receiver never delays a
check), in every scheduler process: leases keep concurrent deliverers from sending the same
notification, and rows left by a process that died are picked up by the next one.  Each
attempt's outcome is counted in `guardrail_alert_deliveries_total{outcome}`:

- `delivered`: a 2xx answer;
- `retry`: a transport error, a timeout, 408, 429 or 5xx: due again after an exponential
  backoff with jitter, or after the receiver's `Retry-After` (seconds or an HTTP date) when it
  gives one;
- `rejected`: any other answer (4xx, or a redirect, which is not followed): given up at once,
  as Alertmanager does, since sending the same body again cannot help;
- `exhausted`: `webhook_max_attempts` attempts failed;
- `expired`: the notification is older than `webhook_max_age_seconds`, or the receiver's
  `Retry-After` points past that age: a page that late helps nobody.
The reason and the last error are stored on the row (`failure_reason`, `last_error`).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from guardrail.service.webhooks import (
    SIGNATURE_HEADER,
    AlertEvent,
    WebhookFormat,
    render,
    signature_header,
)
from storage import outbox
from storage.models import Alert, AlertNotification

__all__ = ["AlertDeliverer", "DeliveryPolicy", "Outcome", "parse_retry_after"]

log = logging.getLogger("guardrail.alert_delivery")
_ERROR_BODY_BYTES = 512  # of a refusal's body, kept in last_error; the rest is never read


class Outcome:
    """The `outcome` label of `guardrail_alert_deliveries_total`."""

    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = outbox.GiveUpReason.REJECTED
    EXHAUSTED = outbox.GiveUpReason.EXHAUSTED
    EXPIRED = outbox.GiveUpReason.EXPIRED
    ALL = (DELIVERED, RETRY, REJECTED, EXHAUSTED, EXPIRED)


@dataclass(frozen=True, kw_only=True, slots=True)
class DeliveryPolicy:
    """How hard to try: attempts, age, backoff and timeouts (seconds)."""

    max_attempts: int = 12
    max_age_seconds: float = 86400.0
    backoff_seconds: float = 5.0
    max_backoff_seconds: float = 900.0
    timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be positive, got: {self.max_attempts}")
        for name in ("max_age_seconds", "backoff_seconds", "max_backoff_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got: {getattr(self, name)}")
        if self.timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be positive, got: {self.timeout_seconds}")

    @property
    def lease_seconds(self) -> float:
        """A claim outlives the longest attempt (connect, write, read) with a margin."""
        return 4 * self.timeout_seconds + 30.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The delay after failed attempt `attempt` (1-based): exponential, capped, with
        "equal jitter" (half fixed, half random), so deliverers that failed together spread."""
        ceiling = min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (attempt - 1))
        return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a `Retry-After` value (delay-seconds or an HTTP date), or None
    when absent or unreadable."""
    if not value or len(value) > 64:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True, slots=True)
class _Attempt:
    status_code: int | None
    error: str | None  # None when delivered
    retry_after: float | None = None
    retryable: bool = True


class AlertDeliverer:
    """Claims due notifications and POSTs them to `url` in `fmt`, signed when `secret`."""

    def __init__(
        self,
        sessions: Any,
        *,
        url: str,
        fmt: WebhookFormat = "generic",
        secret: str | None = None,
        receiver: str = "guardrail",
        public_url: str = "",
        policy: DeliveryPolicy | None = None,
        counter: Any = None,
        owner: str | None = None,
        clock: Callable[[], datetime] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.sessions = sessions
        self.url = url
        self.fmt: WebhookFormat = fmt
        self.secret = secret
        self.receiver = receiver
        self.public_url = public_url.rstrip("/")
        self.policy = policy or DeliveryPolicy()
        self.counter = counter
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.clock = clock or (lambda: datetime.now(UTC))
        self.rng = rng or random.Random()
        self.wake = threading.Event()
        self._client = httpx.Client(
            timeout=self.policy.timeout_seconds,
            follow_redirects=False,
            headers={"User-Agent": "eagle-guardrail-alerts"},
        )

    @classmethod
    def for_runtime(cls, runtime: Any, **kwargs: Any) -> AlertDeliverer | None:
        """The deliverer `runtime.settings` describe, or None without a `webhook_url`."""
        s = runtime.settings
        if not s.webhook_url:
            return None
        policy = DeliveryPolicy(
            max_attempts=s.webhook_max_attempts,
            max_age_seconds=s.webhook_max_age_seconds,
            backoff_seconds=s.webhook_backoff_seconds,
            max_backoff_seconds=s.webhook_max_backoff_seconds,
            timeout_seconds=s.webhook_timeout_seconds,
        )
        return cls(
            runtime.sessions,
            url=s.webhook_url,
            fmt=s.webhook_format,
            secret=s.webhook_secret.get_secret_value() if s.webhook_secret else None,
            receiver=s.webhook_receiver,
            public_url=s.public_url,
            policy=policy,
            counter=runtime.metrics.alert_deliveries,
            **kwargs,
        )

    def close(self) -> None:
        self._client.close()

    def _count(self, outcome: str) -> None:
        if self.counter is not None:
            self.counter.labels(outcome=outcome).inc()

    def deliver_due(self, limit: int = 100) -> int:
        """Give up what is stale, then send due notifications one by one until none is due
        (at most `limit`); returns how many attempts were made."""
        p = self.policy
        with self.sessions.begin() as session:
            stale = outbox.give_up_stale(
                session,
                max_attempts=p.max_attempts,
                max_age_seconds=p.max_age_seconds,
                now=self.clock(),
            )
        for row_id, reason in stale:
            log.warning("alert notification %s given up: %s", row_id, reason)
            self._count(reason)
        attempts = 0
        while attempts < limit:
            with self.sessions.begin() as session:
                row = outbox.claim(
                    session,
                    self.owner,
                    max_attempts=p.max_attempts,
                    lease_seconds=p.lease_seconds,
                    now=self.clock(),
                )
                if row is None:
                    break
                event = self._event(session, row)
                claimed = (row.id, row.attempts, row.created_at, row.alert_id)
            attempts += 1
            self._deliver(event, *claimed)
        return attempts

    def _event(self, session: Any, row: AlertNotification) -> AlertEvent:
        alert = session.get(Alert, row.alert_id)
        assert alert is not None  # the foreign key cascades: a notification has its alert
        details = alert.details or {}
        report_id = details.get("report_id")
        return AlertEvent(
            notification_id=row.id,
            status="resolved" if row.event == "resolved" else "firing",
            model=alert.model,
            started_at=alert.started_at,
            resolved_at=alert.resolved_at if row.event == "resolved" else None,
            rate=alert.rate,
            baseline=alert.baseline,
            threshold=details.get("threshold"),
            window_minutes=details.get("window_minutes"),
            audited_tokens=alert.tokens,
            top_objects=list(details.get("top_objects", [])),
            report_url=f"{self.public_url}/reports/{report_id}" if report_id else None,
            resolved_rate=details.get("resolved_rate") if row.event == "resolved" else None,
        )

    def _post(self, event: AlertEvent) -> _Attempt:
        body = render(event, self.fmt, receiver=self.receiver, external_url=self.public_url)
        headers = {
            "Content-Type": "application/json",
            "X-Guardrail-Notification-Id": str(event.notification_id),
            "X-Guardrail-Event": event.status,
        }
        if self.secret:
            now = int(self.clock().timestamp())
            headers[SIGNATURE_HEADER] = signature_header(self.secret, body, now)
        try:
            with self._client.stream("POST", self.url, content=body, headers=headers) as response:
                code = response.status_code
                if 200 <= code < 300:
                    return _Attempt(code, None)
                head = b""
                for chunk in response.iter_raw():  # a refusal's body, bounded
                    head += chunk
                    if len(head) >= _ERROR_BODY_BYTES:
                        break
                detail = head[:_ERROR_BODY_BYTES].decode("utf-8", "replace").strip()
                error = f"HTTP {code}" + (f": {detail}" if detail else "")
                retry_after = parse_retry_after(response.headers.get("retry-after"), self.clock())
                retryable = code in (408, 429) or code >= 500
                return _Attempt(code, error, retry_after, retryable)
        except httpx.HTTPError as exc:
            return _Attempt(None, f"{type(exc).__name__}: {exc}"[:1000])

    def _deliver(
        self, event: AlertEvent, row_id: int, attempt: int, created_at: datetime, alert_id: int
    ) -> None:
        result = self._post(event)
        now = self.clock()
        if created_at.tzinfo is None:
            created_at = created_at.replace(tzinfo=UTC)
        p = self.policy
        outcome = Outcome.DELIVERED
        with self.sessions.begin() as session:
            if result.error is None:
                kept = outbox.mark_delivered(
                    session, row_id, self.owner, status_code=result.status_code or 0, now=now
                )
            else:
                if not result.retryable:
                    outcome = Outcome.REJECTED
                elif attempt >= p.max_attempts:
                    outcome = Outcome.EXHAUSTED
                else:
                    delay = (
                        result.retry_after
                        if result.retry_after is not None
                        else p.backoff(attempt, self.rng)
                    )
                    due = now + timedelta(seconds=delay)
                    expired = due - created_at > timedelta(seconds=p.max_age_seconds)
                    outcome = Outcome.EXPIRED if expired else Outcome.RETRY
                if outcome == Outcome.RETRY:
                    kept = outbox.retry_at(
                        session,
                        row_id,
                        self.owner,
                        due,
                        error=result.error,
                        status_code=result.status_code,
                    )
                else:
                    kept = outbox.give_up(
                        session,
                        row_id,
                        self.owner,
                        outcome,
                        error=result.error,
                        status_code=result.status_code,
                        now=now,
                    )
            if event.status == "firing" and kept:  # the alert row says how its page went
                alert = session.get(Alert, alert_id)
                if alert is not None:
                    alert.delivery_attempts = attempt
                    alert.delivered_at = now if result.error is None else None
                    alert.delivery_error = result.error
        if not kept:  # the lease ran out mid-send and another deliverer took the row
            log.warning("alert notification %s: lease lost during delivery", row_id)
            return
        self._count(outcome)
        if outcome != Outcome.DELIVERED:
            log.warning(
                "alert notification %s (attempt %d) not delivered: %s (%s)",
                row_id,
                attempt,
                result.error,
                outcome,
            )

    def run(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        """Deliver until `stop` is set: a pass every `poll_seconds`, or at once on `wake`."""
        failures = 0
        while not stop.is_set():
            try:
                self.deliver_due()
                failures = 0
            except Exception:  # the database is down: try again, less often while it stays so
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.exception("alert delivery pass failed (%d in a row)", failures)
            self.wake.wait(min(60.0, poll_seconds * 2 ** min(failures, 6)))
            self.wake.clear()
