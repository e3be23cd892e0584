"""`guardrail report --since ... --until ...`: an audit report on demand."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = ["make_report", "register"]


def _when(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def register(commands: Any) -> None:
    report = commands.add_parser("report", help="render and store an audit report for a period")
    report.add_argument("--config", help="TOML file (default: $GUARDRAIL_CONFIG)")
    report.add_argument("--since", type=_when, help="ISO time (default: 24 hours ago)")
    report.add_argument("--until", type=_when, help="ISO time (default: now)")
    report.add_argument("--out", type=Path, help="also write report.html and report.json here")
    report.set_defaults(handler=_report)


def make_report(runtime: Any, since: datetime, until: datetime, kind: str) -> tuple[str, Any]:
    """Gather, render and store the report; returns (report id, data)."""
    from dashboards.report import render_report
    from guardrail.service.reports import gather_report
    from storage.repositories import store_report

    with runtime.sessions.begin() as session:
        data = gather_report(session, since, until)
        html = render_report(data, title=f"Guardrail audit report ({kind})")
        report_id = store_report(session, kind=kind, since=since, until=until, html=html, data=data)
        return report_id, data


def _report(args: argparse.Namespace) -> int:
    from guardrail.config import load_settings
    from guardrail.service.runtime import build_runtime
    from storage.engine import check_migrated

    until = args.until or datetime.now(UTC)
    since = args.since or until - timedelta(days=1)
    if since >= until:
        raise ValueError(f"--since ({since}) must be before --until ({until})")
    runtime = build_runtime(load_settings(args.config))
    check_migrated(runtime.engine)
    report_id, data = make_report(runtime, since, until, "on_demand")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with runtime.sessions() as session:
            from storage.models import Report

            report = session.get(Report, report_id)
            assert report is not None
            (args.out / "report.html").write_text(report.html)
        slim = {
            **data,
            "worst_examples": [
                {k: v for k, v in ex.items() if k != "heatmap_png"} for ex in data["worst_examples"]
            ],
        }
        (args.out / "report.json").write_text(json.dumps(slim, indent=2) + "\n")
    print(
        f"report {report_id}: {data['audited_words']} audited words, hallucination rate "
        f"{100 * data['hallucination_rate']:.1f}%  (GET /reports/{report_id})"
    )
    return 0
