"""`GET /v1/audits`: recent audited object words with their verdicts, newest first."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, Query

from guardrail.service.routes.common import LIST_ERRORS
from guardrail.service.runtime import Runtime
from storage import reads

__all__ = ["add_audit_routes"]


def add_audit_routes(app: FastAPI, runtime: Runtime, auth: list[Any]) -> None:
    """The audit listing, guarded by `auth`."""

    @app.get("/v1/audits", dependencies=auth, responses=LIST_ERRORS)
    def get_audits(
        model: Annotated[str | None, Query(max_length=128)] = None,
        verdict: Annotated[str | None, Query(max_length=64)] = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Recent audited object words, newest first."""
        with runtime.sessions() as session:
            rows = reads.list_audits(
                session, model=model, label=verdict, since=since, until=until, limit=limit
            )
        return {
            "audits": [
                {
                    "sample_id": row.sample_id,
                    "model": row.model,
                    "request_id": row.request_id,
                    "response_id": row.response_id,
                    "traceparent": row.traceparent,
                    "choice_index": row.choice_index,
                    "received_at": row.received_at.isoformat(),
                    "word": row.word,
                    "category": row.category,
                    "position": row.position,
                    "verdict": row.label.value,
                    "hallucination_score": row.hallucination_score,
                    "prior_score": row.prior_score,
                }
                for row in rows
            ]
        }
