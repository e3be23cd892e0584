"""Spike notifications through the outbox to real loopback receivers: the three formats, the
signature (checked with the documented snippet), resolved notifications, retries that survive
a restart, Retry-After, giving up with a reason, and no double delivery on PostgreSQL."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from guardrail.config import ConfigError, load_settings, masked
from guardrail.service.alert_delivery import AlertDeliverer, DeliveryPolicy, parse_retry_after
from guardrail.service.health import read_backlog
from guardrail.service.metrics import Metrics
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.scheduler import Scheduler, check_spikes
from guardrail.service.webhooks import alertmanager_fingerprint, signature_header, verify_signature
from storage import outbox
from storage.engine import upgrade
from storage.models import Alert, AlertNotification
from tests.guardrail.test_scheduler import NOW, _audited, _baseline

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).with_name("fixtures") / "alertmanager_webhook_v4.json"
SECRET = "s3cret-for-tests-only-0123456789"


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that records every request and answers from `script`
    (status, headers) in order, then `default`."""

    port: int = 0
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    default: tuple[int, dict[str, str]] = (200, {})
    delay: float = 0.0
    requests: list[Request] = field(default_factory=list)

    @contextmanager
    def serving(self) -> Iterator[str]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append(
                    Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                time.sleep(receiver.delay)
                status, headers = receiver.script.pop(0) if receiver.script else receiver.default
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                reply = b'{"ok": true}' if status < 300 else b"no thanks: quota exceeded"
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{self.port}/hook"
        finally:
            server.shutdown()
            server.server_close()


class Clock:
    """An injected clock: backoff and leases are tested without sleeping."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _runtime(url: str, **overrides: Any) -> Runtime:
    settings = load_settings(environ={}, database_url=url, **overrides)
    runtime = build_runtime(settings, Metrics.create(CollectorRegistry()))
    upgrade(runtime.engine)
    return runtime


def _deliverer(runtime: Runtime, clock: Clock, **kwargs: Any) -> AlertDeliverer:
    import random

    deliverer = AlertDeliverer.for_runtime(runtime, clock=clock, rng=random.Random(7), **kwargs)
    assert deliverer is not None
    return deliverer


def _count(runtime: Runtime, outcome: str) -> float:
    value = runtime.metrics.registry.get_sample_value(
        "guardrail_alert_deliveries_total", {"outcome": outcome}
    )
    return value or 0.0


def _firing_alert(runtime: Runtime, now: datetime, model: str = "reference") -> int:
    """A firing alert and its notification, as the spike check writes them."""
    with runtime.sessions.begin() as session:
        alert = Alert(
            model=model,
            state="firing",
            started_at=now,
            rate=0.5,
            baseline=0.05,
            tokens=40,
            details={
                "window_minutes": 10.0,
                "baseline_hours": 6.0,
                "threshold": 0.15,
                "top_objects": [["spoon", 12], ["fork", 8]],
                "report_id": "abc123",
            },
        )
        session.add(alert)
        session.flush()
        return outbox.add(session, alert.id, "firing", now=now).id


def _row(runtime: Runtime, row_id: int) -> AlertNotification:
    with runtime.sessions() as session:
        row = session.get(AlertNotification, row_id)
        assert row is not None
        return row


def _documented_verify() -> Any:
    """The verification snippet of docs/alert-webhooks.md, run as a receiver would."""
    text = (ROOT / "docs" / "alert-webhooks.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)
    return namespace["verify"]


def _spike_then_calm(runtime: Runtime) -> tuple[list[Alert], list[Alert]]:
    _baseline(runtime)
    for minute in (2, 4, 6, 8):  # 40 words at 50% in the last 10 minutes
        _audited(
            runtime, NOW - timedelta(minutes=minute), ["grounded"] * 5 + ["language_prior"] * 5
        )
    fired = check_spikes(runtime, NOW)
    calm = NOW + timedelta(minutes=40)
    for minute in (2, 5, 8):
        _audited(runtime, calm - timedelta(minutes=minute), ["grounded"] * 10)
    return fired, check_spikes(runtime, calm)


def test_generic_firing_then_resolved_signed_and_verified_by_the_documented_snippet(
    tmp_path: Path,
) -> None:
    receiver = Receiver()
    with receiver.serving() as url:
        runtime = _runtime(
            f"sqlite:///{tmp_path / 'g.db'}",
            webhook_url=url,
            webhook_secret=SECRET,
            public_url="https://guardrail.example",
            webhook_max_age_seconds=30 * 86400,  # NOW is days ago; the signature is real-time
        )
        fired, resolved = _spike_then_calm(runtime)
        assert [a.state for a in fired] == ["firing"] and [a.state for a in resolved] == [
            "resolved"
        ]
        assert receiver.requests == []  # the check sends nothing itself: the outbox does
        clock = Clock(datetime.now(UTC))
        deliverer = _deliverer(runtime, clock)
        assert deliverer.deliver_due() == 2
        assert deliverer.deliver_due() == 0  # delivered once each
    firing, cleared = (r.json() for r in receiver.requests)
    # today's keys, unchanged, plus the state
    assert firing["alert"] == "GuardrailHallucinationSpike" and firing["model"] == "reference"
    assert firing["rate"] == pytest.approx(0.5) and firing["baseline"] < 0.2
    assert firing["top_objects"][0][0] == "spoon" and firing["audited_tokens"] == 40
    assert firing["report"].startswith("https://guardrail.example/reports/")
    assert firing["window_minutes"] == 10.0 and firing["threshold"] == pytest.approx(0.15)
    assert firing["status"] == "firing" and firing["resolved_at"] is None
    assert cleared["status"] == "resolved" and cleared["resolved_rate"] == 0.0
    assert cleared["resolved_at"].startswith("2026-11-28T12:40")
    assert cleared["started_at"] == firing["started_at"]
    verify = _documented_verify()
    for request in receiver.requests:
        header = request.headers["x-guardrail-signature"]
        assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header)
        assert verify(SECRET.encode(), header, request.body)
        assert verify_signature(SECRET, header, request.body)
        assert not verify(b"another-secret-entirely", header, request.body)
        assert not verify(SECRET.encode(), header, request.body.replace(b"0.5", b"0.1"))
        assert request.headers["content-type"] == "application/json"
    assert [r.headers["x-guardrail-event"] for r in receiver.requests] == ["firing", "resolved"]
    assert receiver.requests[0].headers["x-guardrail-notification-id"] == str(
        firing["notification_id"]
    )
    with runtime.sessions() as session:
        alert = session.query(Alert).one()
        assert alert.delivered_at is not None and alert.delivery_attempts == 1
        rows = session.query(AlertNotification).order_by(AlertNotification.id).all()
        assert [(r.event, r.status, r.attempts) for r in rows] == [
            ("firing", "delivered", 1),
            ("resolved", "delivered", 1),
        ]
    assert _count(runtime, "delivered") == 2 and _count(runtime, "retry") == 0


def test_a_replayed_or_stale_signature_is_refused() -> None:
    body = b'{"alert":"GuardrailHallucinationSpike"}'
    header = signature_header(SECRET, body, 1_700_000_000)
    assert verify_signature(SECRET, header, body, now=1_700_000_100)
    assert not verify_signature(SECRET, header, body, now=1_700_000_000 + 301)  # replayed later
    assert not verify_signature(SECRET, header.replace("t=1700000000", "t=1700000300"), body)
    assert not verify_signature(SECRET, "v1=deadbeef", body)
    assert not verify_signature(SECRET, "garbage", body)


def test_no_resolved_notification_when_turned_off(tmp_path: Path) -> None:
    runtime = _runtime(
        f"sqlite:///{tmp_path / 'g.db'}",
        webhook_url="http://127.0.0.1:9/hook",
        webhook_send_resolved=False,
    )
    _spike_then_calm(runtime)
    with runtime.sessions() as session:
        assert [r.event for r in session.query(AlertNotification)] == ["firing"]


def test_slack_format(tmp_path: Path) -> None:
    receiver = Receiver()
    with receiver.serving() as url:
        runtime = _runtime(
            f"sqlite:///{tmp_path / 'g.db'}",
            webhook_url=url,
            webhook_format="slack",
            public_url="https://guardrail.example",
        )
        _firing_alert(runtime, NOW)
        assert _deliverer(runtime, Clock(NOW)).deliver_due() == 1
    request = receiver.requests[0]
    assert "x-guardrail-signature" not in request.headers  # no secret: unsigned
    body = request.json()
    assert set(body) == {"text", "blocks"}
    assert body["text"].startswith("Firing: Hallucination rate spike on reference")
    assert [b["type"] for b in body["blocks"]] == ["header", "section", "context"]
    header, section, context = body["blocks"]
    assert header["text"] == {
        "type": "plain_text",
        "text": "Firing: Hallucination rate spike on reference",
    }
    assert section["text"]["type"] == "mrkdwn" and "spoon (12), fork (8)" in section["text"]["text"]
    assert {"type": "mrkdwn", "text": "*Hallucinated share*\n50.0%"} in section["fields"]
    links = context["elements"][0]["text"]
    assert "<https://guardrail.example/reports/abc123|audit report>" in links


def test_alertmanager_format_has_the_documented_shape(tmp_path: Path) -> None:
    documented = json.loads(FIXTURE.read_text())
    receiver = Receiver()
    with receiver.serving() as url:
        runtime = _runtime(
            f"sqlite:///{tmp_path / 'g.db'}",
            webhook_url=url,
            webhook_format="alertmanager",
            webhook_receiver="guardrail-prod",
            public_url="https://guardrail.example",
        )
        _firing_alert(runtime, NOW)
        deliverer = _deliverer(runtime, Clock(NOW + timedelta(seconds=1)))
        assert deliverer.deliver_due() == 1
        with runtime.sessions.begin() as session:
            alert = session.query(Alert).one()
            alert.state, alert.resolved_at = "resolved", NOW + timedelta(minutes=30)
            outbox.add(session, alert.id, "resolved", now=NOW + timedelta(minutes=30))
        deliverer.clock = Clock(NOW + timedelta(minutes=31))
        assert deliverer.deliver_due() == 1
    firing, resolved = (r.json() for r in receiver.requests)
    for body in (firing, resolved):
        assert set(body) == set(documented)
        assert set(body["alerts"][0]) == set(documented["alerts"][0])
        assert body["version"] == "4" and body["truncatedAlerts"] == 0
        assert body["receiver"] == "guardrail-prod"
        assert body["externalURL"] == "https://guardrail.example"
        assert body["groupLabels"] == {
            "alertname": "GuardrailHallucinationSpike",
            "model": "reference",
        }
        assert body["groupKey"] == '{}:{alertname="GuardrailHallucinationSpike", model="reference"}'
        alert = body["alerts"][0]
        assert alert["labels"] == {
            "alertname": "GuardrailHallucinationSpike",
            "model": "reference",
            "severity": "page",
        }
        assert body["commonLabels"] == alert["labels"]
        assert alert["startsAt"] == "2026-11-28T12:00:00Z"
        assert alert["generatorURL"] == "https://guardrail.example/reports/abc123"
        assert alert["annotations"]["report_url"] == alert["generatorURL"]
        assert re.fullmatch(r"[0-9a-f]{16}", alert["fingerprint"])
        assert alert["fingerprint"] == alertmanager_fingerprint(alert["labels"])
    assert firing["status"] == firing["alerts"][0]["status"] == "firing"
    assert firing["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"  # as Alertmanager sends it
    assert resolved["status"] == resolved["alerts"][0]["status"] == "resolved"
    assert resolved["alerts"][0]["endsAt"] == "2026-11-28T12:30:00Z"
    # one alert, one fingerprint: a receiver pairs the resolved with the firing
    assert firing["alerts"][0]["fingerprint"] == resolved["alerts"][0]["fingerprint"]


def test_alertmanager_fingerprint_is_fnv1a_over_sorted_labels() -> None:
    # FNV-1a 64 of the empty input is its offset basis; of "a\xffb\xff" worked out by hand
    assert alertmanager_fingerprint({}) == "cbf29ce484222325"
    h = 0xCBF29CE484222325
    for byte in b"a\xffb\xff":
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    assert alertmanager_fingerprint({"a": "b"}) == f"{h:016x}"
    assert alertmanager_fingerprint({"x": "1", "a": "2"}) == alertmanager_fingerprint(
        {"a": "2", "x": "1"}
    )


def test_a_receiver_down_then_up_gets_the_notification_after_a_restart(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on (yet)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook"
    db = f"sqlite:///{tmp_path / 'g.db'}"
    first = _runtime(db, webhook_url=url, webhook_backoff_seconds=10)
    row_id = _firing_alert(first, NOW)
    clock = Clock(NOW)
    assert _deliverer(first, clock).deliver_due() == 1  # refused: retried later
    row = _row(first, row_id)
    assert row.status == "pending" and row.attempts == 1
    assert "ConnectError" in (row.last_error or "")
    due = row.run_after.replace(tzinfo=UTC)
    # the first backoff: 10 s with equal jitter, between 5 and 10 s
    assert NOW + timedelta(seconds=5) <= due <= NOW + timedelta(seconds=10)
    assert _count(first, "retry") == 1
    first.engine.dispose()  # the process goes away

    receiver = Receiver(port=port)
    with receiver.serving():
        second = _runtime(db, webhook_url=url, webhook_backoff_seconds=10)  # a new process
        restarted = _deliverer(second, clock)
        assert restarted.deliver_due() == 0  # not due yet: no request before the backoff
        assert receiver.requests == []
        clock.now = due
        assert restarted.deliver_due() == 1
    assert len(receiver.requests) == 1
    row = _row(second, row_id)
    assert row.status == "delivered" and row.attempts == 2 and row.last_status_code == 200


def test_a_deliverer_that_died_mid_send_leaves_a_lease_the_next_one_takes(
    tmp_path: Path,
) -> None:
    receiver = Receiver()
    with receiver.serving() as url:
        runtime = _runtime(f"sqlite:///{tmp_path / 'g.db'}", webhook_url=url)
        row_id = _firing_alert(runtime, NOW)
        policy = DeliveryPolicy()
        with runtime.sessions.begin() as session:  # claimed, then the process was killed
            claimed = outbox.claim(
                session, "dead", max_attempts=12, lease_seconds=policy.lease_seconds, now=NOW
            )
            assert claimed is not None
        clock = Clock(NOW + timedelta(seconds=policy.lease_seconds - 1))
        deliverer = _deliverer(runtime, clock)
        assert deliverer.deliver_due() == 0  # the lease still holds
        clock.advance(2)
        assert deliverer.deliver_due() == 1
    assert len(receiver.requests) == 1
    assert _row(runtime, row_id).attempts == 2  # the dead claim counted


def test_429_retry_after_is_honoured(tmp_path: Path) -> None:
    receiver = Receiver(script=[(429, {"Retry-After": "120"})])
    with receiver.serving() as url:
        runtime = _runtime(f"sqlite:///{tmp_path / 'g.db'}", webhook_url=url)
        row_id = _firing_alert(runtime, NOW)
        clock = Clock(NOW)
        deliverer = _deliverer(runtime, clock)
        assert deliverer.deliver_due() == 1
        row = _row(runtime, row_id)
        assert row.run_after.replace(tzinfo=UTC) == NOW + timedelta(seconds=120)
        assert row.last_status_code == 429 and "quota exceeded" in (row.last_error or "")
        clock.advance(119)
        assert deliverer.deliver_due() == 0 and len(receiver.requests) == 1
        clock.advance(1)
        assert deliverer.deliver_due() == 1
    assert len(receiver.requests) == 2 and _row(runtime, row_id).status == "delivered"
    assert _count(runtime, "retry") == 1 and _count(runtime, "delivered") == 1


def test_retry_after_as_an_http_date() -> None:
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert parse_retry_after("Sat, 28 Nov 2026 12:01:30 GMT", now) == 90.0
    assert parse_retry_after("Sat, 28 Nov 2026 11:00:00 GMT", now) == 0.0  # in the past
    assert parse_retry_after("30", now) == 30.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("9" * 100, now) is None  # bounded
    assert parse_retry_after(None, now) is None


def test_delivery_gives_up_with_a_reason(tmp_path: Path) -> None:
    receiver = Receiver(
        script=[(400, {}), (500, {}), (500, {}), (500, {}), (503, {"Retry-After": "7200"})]
    )
    with receiver.serving() as url:
        runtime = _runtime(
            f"sqlite:///{tmp_path / 'g.db'}",
            webhook_url=url,
            webhook_max_attempts=3,
            webhook_max_age_seconds=3600,
        )
        clock = Clock(NOW)
        deliverer = _deliverer(runtime, clock)
        rejected = _firing_alert(runtime, NOW)
        assert deliverer.deliver_due() == 1  # 400: refused, never retried
        exhausted = _firing_alert(runtime, NOW, model="other")
        for _ in range(3):  # 500 three times
            assert deliverer.deliver_due() == 1
            clock.advance(3600 / 4)
        expired = _firing_alert(runtime, clock.now)
        assert deliverer.deliver_due() == 1  # 503 asking for 2 hours: past the age limit
        clock.advance(86400)
        assert deliverer.deliver_due() == 0
    outcomes = {
        row_id: (r.status, r.failure_reason, r.attempts, r.last_status_code)
        for row_id in (rejected, exhausted, expired)
        for r in [_row(runtime, row_id)]
    }
    assert outcomes == {
        rejected: ("failed", "rejected", 1, 400),
        exhausted: ("failed", "exhausted", 3, 500),
        expired: ("failed", "expired", 1, 503),
    }
    assert "HTTP 400" in (_row(runtime, rejected).last_error or "")
    assert len(receiver.requests) == 5
    assert [_count(runtime, o) for o in ("rejected", "exhausted", "expired", "retry")] == [
        1,
        1,
        1,
        2,
    ]
    with runtime.sessions() as session:
        assert outbox.depth(session, NOW).pending == 0


def test_a_notification_nobody_delivered_in_time_expires(tmp_path: Path) -> None:
    runtime = _runtime(
        f"sqlite:///{tmp_path / 'g.db'}",
        webhook_url="http://127.0.0.1:9/hook",
        webhook_max_age_seconds=600,
    )
    row_id = _firing_alert(runtime, NOW)  # no deliverer ran for an hour
    assert _deliverer(runtime, Clock(NOW + timedelta(hours=1))).deliver_due() == 0
    row = _row(runtime, row_id)
    assert (row.status, row.failure_reason, row.attempts) == ("failed", "expired", 0)
    assert _count(runtime, "expired") == 1


def test_two_deliverers_on_postgresql_never_send_the_same_notification() -> None:
    from tests.postgres import schema_url

    receiver = Receiver(delay=0.02)
    with schema_url("gr_alerts") as db, receiver.serving() as url:
        first = _runtime(db, webhook_url=url)
        second = _runtime(db, webhook_url=url)
        rows = [_firing_alert(first, NOW, model=f"m{i}") for i in range(24)]
        deliverers = [_deliverer(rt, Clock(NOW)) for rt in (first, second)]
        start = threading.Barrier(2)
        done: list[int] = []

        def run(deliverer: AlertDeliverer) -> None:
            start.wait()
            done.append(deliverer.deliver_due())

        threads = [threading.Thread(target=run, args=(d,)) for d in deliverers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        first.engine.dispose()
        second.engine.dispose()
    sent = sorted(int(r.headers["x-guardrail-notification-id"]) for r in receiver.requests)
    assert sent == sorted(rows)  # each exactly once
    assert sum(done) == 24
    assert min(done) > 0, f"one deliverer did all the work: {done}"


def test_spike_state_and_outbox_depth_are_exported_at_scrape_time(tmp_path: Path) -> None:
    runtime = _runtime(f"sqlite:///{tmp_path / 'g.db'}", webhook_url="http://127.0.0.1:9/hook")
    runtime.metrics.backlog.reader = lambda: read_backlog(runtime)
    runtime.metrics.backlog.cache_seconds = 0

    def value(name: str, labels: dict[str, str] | None = None) -> float | None:
        return runtime.metrics.registry.get_sample_value(name, labels or {})

    assert value("guardrail_hallucination_spike", {"model": "reference"}) == 0
    assert value("guardrail_alert_outbox_pending") == 0
    row_id = _firing_alert(runtime, datetime.now(UTC) - timedelta(seconds=30))
    assert value("guardrail_hallucination_spike", {"model": "reference"}) == 1
    assert value("guardrail_alert_outbox_pending") == 1
    age = value("guardrail_alert_outbox_oldest_age_seconds")
    assert age is not None and 29 <= age < 120
    with runtime.sessions.begin() as session:
        session.query(AlertNotification).filter_by(id=row_id).update({"status": "delivered"})
        session.query(Alert).update({"state": "resolved"})
    assert value("guardrail_hallucination_spike", {"model": "reference"}) == 0
    assert value("guardrail_alert_outbox_pending") == 0
    text = runtime.metrics.exposition().decode()
    assert 'guardrail_alert_deliveries_total{outcome="exhausted"} 0.0' in text


def test_the_scheduler_delivers_in_its_own_thread(tmp_path: Path) -> None:
    receiver = Receiver()
    with receiver.serving() as url:
        runtime = _runtime(f"sqlite:///{tmp_path / 'g.db'}", webhook_url=url)
        _firing_alert(runtime, datetime.now(UTC))
        scheduler = Scheduler(runtime, election_seconds=60)
        assert scheduler.deliverer is not None
        scheduler.start()
        try:
            deadline = time.monotonic() + 10
            while not receiver.requests and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            scheduler.stop()
    assert len(receiver.requests) == 1
    assert Scheduler(_runtime(f"sqlite:///{tmp_path / 'h.db'}")).deliverer is None


def test_webhook_settings_come_from_the_environment_and_the_secret_is_masked() -> None:
    settings = load_settings(
        environ={
            "GUARDRAIL_WEBHOOK_URL": "https://hooks.example/T0/B0",
            "GUARDRAIL_WEBHOOK_FORMAT": "alertmanager",
            "GUARDRAIL_WEBHOOK_SECRET": SECRET,
            "GUARDRAIL_WEBHOOK_SEND_RESOLVED": "false",
            "GUARDRAIL_WEBHOOK_MAX_ATTEMPTS": "4",
        }
    )
    assert settings.webhook_format == "alertmanager" and not settings.webhook_send_resolved
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == SECRET
    assert settings.webhook_max_attempts == 4
    assert SECRET not in json.dumps(masked(settings))
    with pytest.raises(ConfigError, match="webhook_secret must be at least 16 characters"):
        load_settings(environ={"GUARDRAIL_WEBHOOK_SECRET": "short"})
    with pytest.raises(ConfigError, match="webhook_url must be an http"):
        load_settings(environ={"GUARDRAIL_WEBHOOK_URL": "ftp://hooks.example/x"})
    with pytest.raises(ConfigError, match="webhook_format"):
        load_settings(environ={"GUARDRAIL_WEBHOOK_FORMAT": "teams"})


def test_retention_deletes_old_alerts_with_their_notifications(tmp_path: Path) -> None:
    from guardrail.service.scheduler import retain

    runtime = _runtime(f"sqlite:///{tmp_path / 'g.db'}", webhook_url="http://127.0.0.1:9/hook")
    _firing_alert(runtime, NOW - timedelta(days=40))
    kept = _firing_alert(runtime, NOW - timedelta(days=1), model="other")
    assert retain(runtime, NOW).alerts == 1
    with runtime.sessions() as session:
        assert [r.id for r in session.query(AlertNotification)] == [kept]


def test_the_scheduler_child_process_delivers_and_its_counts_reach_serve(tmp_path: Path) -> None:
    """As `guardrail serve` runs it: the scheduler in a supervised child process delivers the
    outbox, and its delivery counter reaches the parent's /metrics over the snapshot pipe."""
    from guardrail.service.supervisor import Supervisor

    receiver = Receiver()
    with receiver.serving() as url:
        runtime = _runtime(f"sqlite:///{tmp_path / 'g.db'}", webhook_url=url)
        _firing_alert(runtime, datetime.now(UTC))
        supervisor = Supervisor(runtime.settings, runtime.metrics, workers=0, scheduler=True)
        supervisor.start()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and b'outcome="delivered"} 1.0' not in (
                runtime.metrics.exposition()
            ):
                time.sleep(0.1)
        finally:
            supervisor.stop()
    assert len(receiver.requests) == 1
    assert b'guardrail_alert_deliveries_total{outcome="delivered"} 1.0' in (
        runtime.metrics.exposition()
    )


def test_the_outbox_benchmark_prints_json() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "alert_outbox.py"),
            "--notifications",
            "10",
            "--deliverers",
            "2",
            "--databases",
            "sqlite",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    (row,) = json.loads(proc.stdout)["results"]
    assert (row["received"], row["duplicates"], row["deliverers"]) == (10, 0, 2)


def test_a_notification_whose_deliverer_died_on_its_last_attempt_is_exhausted(
    tmp_path: Path,
) -> None:
    runtime = _runtime(
        f"sqlite:///{tmp_path / 'g.db'}",
        webhook_url="http://127.0.0.1:9/hook",
        webhook_max_attempts=1,
    )
    row_id = _firing_alert(runtime, NOW)
    with runtime.sessions.begin() as session:
        assert outbox.claim(session, "dead", max_attempts=1, lease_seconds=60, now=NOW)
    assert _deliverer(runtime, Clock(NOW + timedelta(seconds=30))).deliver_due() == 0
    assert _row(runtime, row_id).status == "pending"  # its lease still holds
    assert _deliverer(runtime, Clock(NOW + timedelta(seconds=61))).deliver_due() == 0
    row = _row(runtime, row_id)
    assert (row.status, row.failure_reason, row.attempts) == ("failed", "exhausted", 1)
    assert _count(runtime, "exhausted") == 1
