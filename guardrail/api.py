"""The HTTP API (FastAPI): ingest, sample status, audit listing, health, metrics.

`POST /v1/samples` answers 202 with the sample id once the sample and its job are committed,
or 200 with `sampled: false` and the reason; malformed input gets a 4xx that says what is
wrong, and nothing accepted is lost (the job is in the database before the answer leaves).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy import select

from guardrail import __version__
from guardrail.ingest import IngestError, IngestRequest, ingest
from guardrail.runtime import Runtime
from storage.engine import UnmigratedDatabaseError, check_migrated
from storage.models import Job, Report, Sample
from storage.repositories import get_sample, list_audits

__all__ = ["SampleIn", "create_app"]

FORCE_HEADER = "X-Guardrail-Audit"


class SampleIn(BaseModel):
    """A model output to audit."""

    model_config = {"extra": "forbid"}

    model: str = Field(description="a model name from the configuration")
    prompt: str = Field(
        description="the prompt as sent (with the image placeholder, or "
        "the user text when the model has a prompt template)"
    )
    output: str | None = Field(default=None, description="the generated text")
    token_ids: list[int] | None = Field(default=None, description="the generated token ids")
    image_base64: str = Field(description="the image, base64 (PNG, JPEG or WebP; data URL ok)")
    request_id: str | None = Field(default=None, max_length=128)
    metadata: dict[str, Any] = Field(default_factory=dict)
    audit: bool = Field(default=False, description="always audit this one")


class SampleAccepted(BaseModel):
    sampled: bool
    id: str | None = None
    status: str | None = None
    reason: str | None = None


def _decode_base64(data: str) -> bytes:
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(422, f"image_base64 is not valid base64: {exc}") from None


def create_app(runtime: Runtime) -> FastAPI:
    settings = runtime.settings
    tokens = [t.get_secret_value().encode() for t in settings.api_tokens]
    from guardrail.proxy import add_proxy_routes

    app = FastAPI(
        title="eagle-guardrail",
        version=__version__,
        description="Hallucination guardrail sidecar for multimodal LLMs (EAGLE attribution).",
    )
    app.state.runtime = runtime

    def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        if not tokens:
            return
        if not authorization or not authorization.lower().startswith("bearer "):
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        given = authorization[7:].strip().encode()
        if not any(hmac.compare_digest(given, t) for t in tokens):
            raise HTTPException(403, "this token is not allowed")

    auth = [Depends(authorize)]

    async def ingest_json(body: SampleIn, image_bytes: bytes, force: bool) -> JSONResponse:
        request = IngestRequest(
            model=body.model,
            prompt=body.prompt,
            image_bytes=image_bytes,
            output=body.output,
            token_ids=body.token_ids,
            request_id=body.request_id,
            metadata=body.metadata,
            force=force or body.audit,
        )
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(runtime.ingest_executor, ingest, runtime, request)
        except IngestError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        return JSONResponse(answer, status_code=202 if answer["sampled"] else 200)

    @app.post(
        "/v1/samples",
        dependencies=auth,
        status_code=202,
        response_model=SampleAccepted,
        responses={200: {"description": "not sampled"}, 404: {}, 413: {}, 422: {}},
    )
    async def post_sample(
        body: SampleIn,
        x_guardrail_audit: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        """Offer a model output (JSON, image as base64) for audit."""
        image_bytes = _decode_base64(body.image_base64)
        return await ingest_json(
            body, image_bytes, (x_guardrail_audit or "").lower() in ("1", "always")
        )

    @app.post(
        "/v1/samples/upload", dependencies=auth, status_code=202, response_model=SampleAccepted
    )
    async def post_sample_upload(
        image: Annotated[UploadFile, File(description="the image file")],
        model: Annotated[str, Form()],
        prompt: Annotated[str, Form()],
        output: Annotated[str | None, Form()] = None,
        token_ids: Annotated[str | None, Form(description="JSON list of ints")] = None,
        request_id: Annotated[str | None, Form()] = None,
        metadata: Annotated[str | None, Form(description="JSON object")] = None,
        x_guardrail_audit: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        """Offer a model output as a multipart upload."""
        try:
            ids = json.loads(token_ids) if token_ids else None
            meta = json.loads(metadata) if metadata else {}
        except json.JSONDecodeError as exc:
            raise HTTPException(422, f"token_ids/metadata must be JSON: {exc}") from None
        data = await image.read(settings.max_image_bytes + 1)
        try:
            body = SampleIn(
                model=model,
                prompt=prompt,
                output=output,
                token_ids=ids,
                image_base64="",
                request_id=request_id,
                metadata=meta,
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return await ingest_json(body, data, (x_guardrail_audit or "").lower() in ("1", "always"))

    @app.get("/v1/samples/{sample_id}", dependencies=auth)
    def get_sample_status(sample_id: str) -> dict[str, Any]:
        """A sample's status, flagged tokens and verdicts with their numbers."""
        with runtime.sessions() as session:
            sample = get_sample(session, sample_id)
            if sample is None:
                raise HTTPException(404, f"no sample {sample_id!r}")
            view = _sample_view(sample)
            job = (
                session.execute(
                    select(Job).where(Job.sample_id == sample_id).order_by(Job.id.desc())
                )
                .scalars()
                .first()
            )
            if job is not None:
                view["job"] = {
                    "status": job.status.value,
                    "attempts": job.attempts,
                    "error": job.last_error,
                }
            return view

    @app.get("/v1/audits", dependencies=auth)
    def get_audits(
        model: str | None = None,
        verdict: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Recent audited object words, newest first."""
        with runtime.sessions() as session:
            rows = list_audits(
                session, model=model, label=verdict, since=since, until=until, limit=limit
            )
            return {
                "audits": [
                    {
                        "sample_id": s.id,
                        "model": s.model,
                        "received_at": s.received_at.isoformat(),
                        "word": t.word,
                        "category": t.category,
                        "position": t.position,
                        "verdict": v.label,
                        "hallucination_score": v.hallucination_score,
                        "prior_score": v.prior_score,
                    }
                    for s, t, v in rows
                ]
            }

    add_proxy_routes(app, runtime)

    @app.get("/v1/reports", dependencies=auth)
    def list_reports(limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
        """Stored audit reports, newest first."""
        with runtime.sessions() as session:
            rows = session.execute(
                select(Report).order_by(Report.period_end.desc()).limit(limit)
            ).scalars()
            return {
                "reports": [
                    {
                        "id": r.id,
                        "kind": r.kind,
                        "since": r.period_start.isoformat(),
                        "until": r.period_end.isoformat(),
                        "created_at": r.created_at.isoformat(),
                        "url": f"/reports/{r.id}",
                        "hallucination_rate": r.data.get("hallucination_rate"),
                        "audited_words": r.data.get("audited_words"),
                    }
                    for r in rows
                ]
            }

    @app.get("/v1/reports/{report_id}", dependencies=auth)
    def report_data(report_id: str) -> dict[str, Any]:
        """One report's figures as JSON (report.json; heatmap images left out)."""
        with runtime.sessions() as session:
            report = session.get(Report, report_id)
            if report is None:
                raise HTTPException(404, f"no report {report_id!r}")
            data = dict(report.data)
            data["worst_examples"] = [
                {k: v for k, v in ex.items() if k != "heatmap_png"}
                for ex in data.get("worst_examples", [])
            ]
            return {"id": report.id, "kind": report.kind, **data}

    @app.get("/reports/{report_id}", dependencies=auth, response_class=HTMLResponse)
    def show_report(report_id: str) -> HTMLResponse:
        """One report as a self-contained HTML page."""
        with runtime.sessions() as session:
            report = session.get(Report, report_id)
            if report is None:
                raise HTTPException(404, f"no report {report_id!r}")
            return HTMLResponse(report.html)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        problems = []
        try:
            check_migrated(runtime.engine)
        except UnmigratedDatabaseError as exc:
            problems.append(str(exc))
        except Exception as exc:  # unreachable database
            problems.append(f"database: {type(exc).__name__}: {exc}")
        if runtime.workers:
            missing = [n for n, a in runtime.auditors.items() if not a.loaded]
            if missing:
                problems.append(f"models not loaded yet: {', '.join(missing)}")
        status = 200 if not problems else 503
        return JSONResponse({"ready": not problems, "problems": problems}, status_code=status)

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _sample_view(sample: Sample) -> dict[str, Any]:
    tokens = []
    for t in sample.tokens:
        a, v = t.attribution, t.verdict
        tokens.append(
            {
                "position": t.position,
                "token_id": t.token_id,
                "word": t.word,
                "category": t.category,
                "verdict": None
                if v is None
                else {
                    "label": v.label,
                    "hallucination_score": v.hallucination_score,
                    "prior_score": v.prior_score,
                    "reason": v.reason,
                    **v.numbers,
                },
                "attribution": None
                if a is None
                else {
                    "compact_set": a.compact_set,
                    "order": a.order,
                    "forward_passes": a.forward_passes,
                    "seconds": a.seconds,
                    "stopped_by": a.stopped_by,
                    "search": a.search,
                    "scorer": a.scorer_name,
                    "partition": a.partition_method,
                    "fill": a.fill,
                },
            }
        )
    return {
        "id": sample.id,
        "model": sample.model,
        "status": sample.status.value,
        "received_at": sample.received_at.isoformat(),
        "request_id": sample.request_id,
        "image_sha256": sample.image_sha256,
        "image_size": [sample.image_width, sample.image_height],
        "output": sample.generated_text,
        "tokens": tokens,
    }
