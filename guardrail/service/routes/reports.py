"""Audit reports: `GET /v1/reports` (the listing), `GET /v1/reports/{id}` (one report's
figures as JSON) and `GET /reports/{id}` (the self-contained HTML page)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Path, Query
from fastapi.responses import HTMLResponse

from guardrail.service.http_errors import ApiError, error_responses
from guardrail.service.routes.common import LIST_ERRORS, READ_ERRORS, checked_id
from guardrail.service.runtime import Runtime
from storage import reads

__all__ = ["add_report_routes"]


def add_report_routes(app: FastAPI, runtime: Runtime, auth: list[Any]) -> None:
    """The report listing, data and pages, guarded by `auth`."""

    @app.get("/v1/reports", dependencies=auth, responses=LIST_ERRORS)
    def list_reports(limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
        """Stored audit reports, newest first."""
        with runtime.sessions() as session:
            rows = reads.list_reports(session, limit=limit)
        return {
            "reports": [
                {
                    "id": r.id,
                    "kind": r.kind,
                    "since": r.since.isoformat(),
                    "until": r.until.isoformat(),
                    "created_at": r.created_at.isoformat(),
                    "url": f"/reports/{r.id}",
                    "hallucination_rate": r.hallucination_rate,
                    "audited_words": r.audited_words,
                }
                for r in rows
            ]
        }

    @app.get("/v1/reports/{report_id}", dependencies=auth, responses=READ_ERRORS)
    def report_data(
        report_id: Annotated[str, Path(description="32 lowercase hexadecimal characters")],
    ) -> dict[str, Any]:
        """One report's figures as JSON (report.json; heatmap images left out)."""
        checked_id("report", report_id)
        with runtime.sessions() as session:
            report = reads.report(session, report_id)
        if report is None:
            raise ApiError(404, f"no report {report_id!r}")
        data = dict(report.data)
        data["worst_examples"] = [
            {k: v for k, v in ex.items() if k != "heatmap_png"}
            for ex in data.get("worst_examples", [])
        ]
        return {"id": report.id, "kind": report.kind, **data}

    @app.get(
        "/reports/{report_id}",
        dependencies=auth,
        response_class=HTMLResponse,
        responses=error_responses(400, 401, 403, 404, 422, 500, 503, html_route=True),
    )
    def show_report(
        report_id: Annotated[str, Path(description="32 lowercase hexadecimal characters")],
    ) -> HTMLResponse:
        """One report as a self-contained HTML page."""
        checked_id("report", report_id)
        with runtime.sessions() as session:
            report = reads.report(session, report_id)
        if report is None:
            raise ApiError(404, f"no report {report_id!r}")
        return HTMLResponse(report.html)
