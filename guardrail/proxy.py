"""The OpenAI-compatible proxy: `POST /v1/chat/completions` forwarded to the upstream model.

The response (streamed or not) goes back to the client byte for byte; the request's image and
the response text are teed to ingest after the response has been sent.  The proxy fails open:
if parsing, ingest or the database fail, the client still gets the upstream's answer and
`guardrail_proxy_fail_open_drops_total{reason}` counts what was not audited.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from guardrail.auditor import image_placeholder
from guardrail.chat import ChatFormatError, chat_input
from guardrail.ingest import IngestError, IngestRequest, ingest
from guardrail.runtime import Runtime

__all__ = ["add_proxy_routes"]

log = logging.getLogger("guardrail.proxy")

_HOP = {
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "accept-encoding",
    "content-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-connection",
}
FORCE_HEADER = "x-guardrail-audit"


def _headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP}


def _sse_text(raw: bytes) -> str:
    """The assistant text carried by a chat-completions event stream."""
    pieces = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if not data or data == "[DONE]":
            continue
        event = json.loads(data)
        for choice in event.get("choices", [])[:1]:
            pieces.append((choice.get("delta") or {}).get("content") or "")
    return "".join(pieces)


def add_proxy_routes(app: FastAPI, runtime: Runtime) -> None:
    settings = runtime.settings
    metrics = runtime.metrics
    clients: dict[str, httpx.AsyncClient] = {}

    def client() -> httpx.AsyncClient:
        if "c" not in clients:
            clients["c"] = httpx.AsyncClient(
                base_url=str(settings.upstream_url).rstrip("/"),
                timeout=httpx.Timeout(300.0, connect=10.0),
            )
        return clients["c"]

    def drop(reason: str) -> None:
        metrics.proxy_fail_open_drops.labels(reason=reason).inc()

    def tee(body: bytes, text: str | None, headers: dict[str, str]) -> None:
        """Hand the exchange to ingest; never raises (fail open)."""
        try:
            if text is None:
                drop("response_unreadable")
                return
            request = json.loads(body)
            model = settings.model(str(request.get("model")))
            if model is None:
                drop("unknown_model")
                return
            auditor = runtime.auditors[model.name]
            parsed = chat_input(request, image_placeholder(model.family), model.prompt)
            ingest(
                runtime,
                IngestRequest(
                    model=model.name,
                    prompt=auditor.prompt_for(parsed.prompt),
                    image_bytes=parsed.image_bytes,
                    output=text,
                    request_id=headers.get("x-request-id"),
                    metadata={"source": "proxy"},
                    force=headers.get(FORCE_HEADER, "").lower() in ("1", "always"),
                ),
            )
        except ChatFormatError:
            drop("no_image")
        except (IngestError, json.JSONDecodeError, UnicodeDecodeError):
            drop("rejected")
        except Exception as exc:  # the database or anything else: traffic must still flow
            log.warning("proxy: could not tee a sample to ingest: %s", str(exc).splitlines()[0])
            drop("ingest_error")

    pending = threading.BoundedSemaphore(settings.proxy_max_pending or 1)

    def release_after(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        finally:
            pending.release()

    async def submit(fn: Any, *args: Any) -> None:
        """Run the tee on the ingest executor without holding up the event loop; when too
        many are waiting (the database is slow), drop it and count it (memory stays bounded)."""
        if settings.proxy_max_pending == 0 or not pending.acquire(blocking=False):
            drop("backlog")
            return
        try:
            runtime.ingest_executor.submit(release_after, fn, *args)
        except RuntimeError:  # the executor is shutting down
            pending.release()
            drop("shutting_down")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        """OpenAI-compatible chat completions, forwarded to the configured upstream."""
        if not settings.upstream_url:
            return JSONResponse(
                {"error": {"message": "no upstream_url configured", "type": "guardrail"}},
                status_code=503,
            )
        body = await request.body()
        headers = _headers(request.headers)
        lower = {k.lower(): v for k, v in request.headers.items()}
        try:
            model_label = str(json.loads(body).get("model"))
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            model_label = "other"
        if settings.model(model_label) is None:
            model_label = "other"
        started = time.perf_counter()
        upstream = client().build_request(
            "POST",
            "/v1/chat/completions",
            content=body,
            headers=headers,
            params=request.query_params,
        )
        try:
            response = await client().send(upstream, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse(
                {"error": {"message": f"upstream unreachable: {exc}", "type": "guardrail"}},
                status_code=502,
            )
        metrics.proxy_upstream_latency.labels(model=model_label).observe(
            time.perf_counter() - started
        )
        out_headers = _headers(response.headers)
        if "text/event-stream" not in response.headers.get("content-type", ""):
            content = await response.aread()
            await response.aclose()
            text: str | None = None
            if response.status_code == 200:
                try:
                    text = json.loads(content)["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    text = None
            background = (
                BackgroundTask(submit, tee, body, text, lower)
                if response.status_code == 200
                else None
            )
            return Response(
                content=content,
                status_code=response.status_code,
                headers=out_headers,
                background=background,
            )

        seen: list[bytes] = []

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    seen.append(chunk)
                    yield chunk
            finally:
                await response.aclose()

        def after_stream() -> None:
            try:
                text = _sse_text(b"".join(seen))
            except (ValueError, KeyError, TypeError):
                drop("response_unreadable")
                return
            tee(body, text, lower)

        return StreamingResponse(
            relay(),
            status_code=response.status_code,
            headers=out_headers,
            background=BackgroundTask(submit, after_stream)
            if response.status_code == 200
            else None,
        )
