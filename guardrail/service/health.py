"""Liveness, readiness per part, and `/metrics`.

The parts fail separately, so they are probed separately:
- `GET /healthz`: liveness; the process answers (restart it if not).
- `GET /readyz`: the proxy's readiness; it never touches the database, so a database outage
  (which only degrades ingest: the proxy fails open) never takes the proxy out of service.
- `GET /readyz/ingest`: the database is reachable and migrated (503 with the reason if not).
- `GET /readyz/audit`: live audit workers (from their heartbeats in the database) and the
  backlog; 503 when no worker is live.
- `GET /metrics`: Prometheus; the backlog gauges are read from the database at scrape time.
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from guardrail.service.metrics import Backlog
from guardrail.service.runtime import Runtime

__all__ = ["add_health_routes", "read_backlog"]


def read_backlog(runtime: Runtime) -> Backlog:
    """The queue, the live workers, the alert outbox and the spike state per model, as the
    database says now."""
    from storage import outbox, queue, reads

    with runtime.sessions() as session:
        d = queue.depth(session, live_within_seconds=runtime.settings.worker_liveness_seconds)
        o = outbox.depth(session)
        firing = reads.firing_models(session)
    return Backlog(
        d.queued,
        d.running,
        d.oldest_age_seconds,
        d.live_workers,
        alerts_pending=o.pending,
        alerts_oldest_age_seconds=o.oldest_age_seconds,
        spikes=tuple((m.name, m.name in firing) for m in runtime.settings.models),
    )


def _problem(exc: Exception) -> str:
    """One line for a database failure, naming the database (password masked) when the
    engine recorded it."""
    from storage.engine import failed_database

    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    where = failed_database(exc)
    return f"{type(exc).__name__}{f' ({where})' if where else ''}: {lines[0] if lines else ''}"


def add_health_routes(app: FastAPI, runtime: Runtime) -> None:
    runtime.metrics.backlog.reader = lambda: read_backlog(runtime)
    migrated = threading.Event()  # a schema, once migrated, stays migrated: check it once

    def database_problem() -> str | None:
        from sqlalchemy import text

        from storage.engine import UnmigratedDatabaseError, check_migrated

        try:
            if migrated.is_set():
                with runtime.engine.connect() as connection:
                    connection.execute(text("select 1"))
            else:
                check_migrated(runtime.engine)
                migrated.set()
        except UnmigratedDatabaseError as exc:
            return str(exc)
        except Exception as exc:  # unreachable, refused, timed out
            return f"database: {_problem(exc)}"
        return None

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> dict[str, Any]:
        """Readiness of the proxy (never depends on the database: the proxy fails open)."""
        return {
            "ready": True,
            "proxy": {"upstream_configured": bool(runtime.settings.upstream_url)},
        }

    @app.get("/readyz/ingest", tags=["health"])
    def ready_ingest() -> JSONResponse:
        """Ingest can accept samples: the database is reachable and migrated."""
        problem = database_problem()
        body = {"ready": problem is None, "problems": [problem] if problem else []}
        headers = {"Retry-After": "5"} if problem else None
        return JSONResponse(body, status_code=200 if problem is None else 503, headers=headers)

    @app.get("/readyz/audit", tags=["health"])
    def ready_audit() -> JSONResponse:
        """Audits are running: at least one live worker, with the backlog it faces."""
        problems = []
        backlog: dict[str, Any] = {}
        try:
            b = read_backlog(runtime)
            backlog = {
                "queued": b.queued,
                "running": b.running,
                "oldest_job_age_seconds": round(b.oldest_age_seconds, 1),
                "live_workers": b.live_workers,
            }
            if b.live_workers == 0:
                problems.append(
                    "no live audit worker (no heartbeat in the last "
                    f"{runtime.settings.worker_liveness_seconds:.0f} s): queued samples wait"
                )
        except Exception as exc:
            problems.append(f"database: {_problem(exc)}")
        supervisor = runtime.supervisor
        children = supervisor.alive() if supervisor is not None else {}
        body = {"ready": not problems, "problems": problems, "backlog": backlog}
        if supervisor is not None:
            body["children"] = children
        headers = {"Retry-After": "30"} if problems else None
        return JSONResponse(body, status_code=200 if not problems else 503, headers=headers)

    @app.get("/metrics", tags=["health"])
    def metrics() -> Response:
        """Prometheus metrics (this process's, its audit processes', and the backlog)."""
        return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
