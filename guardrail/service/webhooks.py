"""What a spike notification says, in the receiver's format, and its signature.

Formats (`webhook_format`):
- `generic`: the guardrail's own JSON (the keys it always had, plus `status`,
  `resolved_at`, `resolved_rate` and `notification_id`).
- `slack`: a Slack incoming-webhook message: `text` (the fallback shown in notifications) and
  Block Kit `blocks`.
- `alertmanager`: the JSON Alertmanager's webhook receiver sends (`version` "4"), so that any
  receiver written for Alertmanager (ticketing, paging, chat bridges) takes it unchanged; the
  fingerprint is Alertmanager's (FNV-1a 64 of the sorted labels).

Signature (`webhook_secret` set): `X-Guardrail-Signature: t=<unix seconds>,v1=<hex>` where
`<hex>` is HMAC-SHA256 with the secret of `"<t>." + body` (Stripe's scheme).  The receiver
recomputes it over the raw body, compares in constant time and refuses a `t` too far from its
clock, so a captured request cannot be replayed later; `verify_signature` does all three, and
docs/alert-webhooks.md has the same check in a dozen lines of standard-library Python.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = [
    "ALERT_NAME",
    "SIGNATURE_HEADER",
    "AlertEvent",
    "WebhookFormat",
    "alertmanager_fingerprint",
    "render",
    "sign",
    "signature_header",
    "verify_signature",
]

ALERT_NAME = "GuardrailHallucinationSpike"
SIGNATURE_HEADER = "X-Guardrail-Signature"
RUNBOOK_URL = (
    "https://github.com/eagle-guardrail/eagle-guardrail/blob/main/docs/runbook.md"
    "#guardrailhallucinationspike"
)
WebhookFormat = Literal["generic", "slack", "alertmanager"]
_GO_ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of a firing alert


@dataclass(frozen=True, kw_only=True, slots=True)
class AlertEvent:
    """One state change of a spike alert, as every format needs it."""

    notification_id: int
    status: Literal["firing", "resolved"]
    model: str
    started_at: datetime
    resolved_at: datetime | None
    rate: float  # hallucinated share of the short window when it fired
    baseline: float
    threshold: float | None
    window_minutes: float | None
    audited_tokens: int
    top_objects: list[list[Any]]
    report_url: str | None
    resolved_rate: float | None = None  # the short window's share when it resolved


def _rfc3339(when: datetime) -> str:
    if when.tzinfo is None:  # SQLite drops the zone; every stored time is UTC
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _summary(e: AlertEvent) -> str:
    if e.status == "resolved":
        return f"Hallucination rate spike on {e.model} resolved"
    return f"Hallucination rate spike on {e.model}"


def _description(e: AlertEvent) -> str:
    objects = ", ".join(f"{name} ({count})" for name, count in e.top_objects[:5]) or "none"
    window = f"{e.window_minutes:g} minutes" if e.window_minutes is not None else "the window"
    text = (
        f"{_percent(e.rate)} of the {e.audited_tokens} object words audited on {e.model} in "
        f"{window} were judged hallucinated (baseline {_percent(e.baseline)}, threshold "
        f"{_percent(e.threshold)}); most often: {objects}."
    )
    if e.status == "resolved":
        text += f" Resolved at {_percent(e.resolved_rate)}."
    return text


def _generic(e: AlertEvent) -> dict[str, Any]:
    return {
        "alert": ALERT_NAME,
        "status": e.status,
        "model": e.model,
        "started_at": e.started_at.isoformat(),
        "resolved_at": e.resolved_at.isoformat() if e.resolved_at else None,
        "window_minutes": e.window_minutes,
        "rate": e.rate,
        "baseline": e.baseline,
        "threshold": e.threshold,
        "audited_tokens": e.audited_tokens,
        "top_objects": e.top_objects,
        "resolved_rate": e.resolved_rate,
        "report": e.report_url,
        "notification_id": e.notification_id,
    }


def _slack_escape(text: str) -> str:
    # the three characters Slack's mrkdwn gives a meaning to
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack(e: AlertEvent) -> dict[str, Any]:
    resolved = e.status == "resolved"
    title = f"{'Resolved' if resolved else 'Firing'}: {_summary(e)}"[:150]
    fields = [
        ("Hallucinated share", _percent(e.resolved_rate if resolved else e.rate)),
        ("Baseline", _percent(e.baseline)),
        ("Threshold", _percent(e.threshold)),
        ("Audited words", str(e.audited_tokens)),
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title}},
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": _slack_escape(_description(e))[:3000]},
            "fields": [
                {"type": "mrkdwn", "text": f"*{name}*\n{_slack_escape(value)}"}
                for name, value in fields
            ],
        },
    ]
    context = [f"started {_rfc3339(e.started_at)}"]
    if e.resolved_at is not None:
        context.append(f"resolved {_rfc3339(e.resolved_at)}")
    if e.report_url:
        context.append(f"<{_slack_escape(e.report_url)}|audit report>")
    context.append(f"<{RUNBOOK_URL}|runbook>")
    blocks.append(
        {"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(context)}]}
    )
    return {"text": _slack_escape(f"{title}: {_description(e)}"), "blocks": blocks}


def alertmanager_fingerprint(labels: dict[str, str]) -> str:
    """Alertmanager's fingerprint of a label set: FNV-1a 64 over the labels sorted by name,
    each name and value followed by the byte 0xff, as 16 hex digits."""
    h = 0xCBF29CE484222325
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in (*part.encode(), 0xFF):
                h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def _alertmanager(e: AlertEvent, *, receiver: str, external_url: str) -> dict[str, Any]:
    labels = {"alertname": ALERT_NAME, "model": e.model, "severity": "page"}
    annotations = {
        "summary": _summary(e),
        "description": _description(e),
        "runbook_url": RUNBOOK_URL,
    }
    if e.report_url:
        annotations["report_url"] = e.report_url
    group = {"alertname": ALERT_NAME, "model": e.model}
    alert = {
        "status": e.status,
        "labels": labels,
        "annotations": annotations,
        "startsAt": _rfc3339(e.started_at),
        "endsAt": _rfc3339(e.resolved_at) if e.resolved_at else _GO_ZERO_TIME,
        "generatorURL": e.report_url or external_url,
        "fingerprint": alertmanager_fingerprint(labels),
    }
    return {
        "version": "4",
        "groupKey": "{}:{" + ", ".join(f'{k}="{v}"' for k, v in sorted(group.items())) + "}",
        "truncatedAlerts": 0,
        "status": e.status,
        "receiver": receiver,
        "groupLabels": group,
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": external_url,
        "alerts": [alert],
    }


def render(
    event: AlertEvent,
    fmt: WebhookFormat,
    *,
    receiver: str = "guardrail",
    external_url: str = "",
) -> bytes:
    """The notification's body in format `fmt`, as the bytes to send (and sign).

    Raises:
        ValueError: an unknown format.
    """
    if fmt == "generic":
        body = _generic(event)
    elif fmt == "slack":
        body = _slack(event)
    elif fmt == "alertmanager":
        body = _alertmanager(event, receiver=receiver, external_url=external_url)
    else:
        raise ValueError(f"webhook format must be generic, slack or alertmanager, got: {fmt!r}")
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The hex HMAC-SHA256 of `"<timestamp>." + body` under `secret`."""
    message = str(int(timestamp)).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-Guardrail-Signature` value: `t=<timestamp>,v1=<hex>`."""
    return f"t={int(timestamp)},v1={sign(secret, body, timestamp)}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance_seconds: float = 300.0,
    now: float | None = None,
) -> bool:
    """True when `header` signs `body` under `secret` and its timestamp is within
    `tolerance_seconds` of `now` (default: this machine's clock)."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        timestamp = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        return False
    expected = sign(secret, body, timestamp)
    return any(hmac.compare_digest(expected, given) for given in parts.get("v1", []))
