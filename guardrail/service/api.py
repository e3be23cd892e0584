"""The HTTP API (FastAPI): the app that composes the routes.

`guardrail.service.routes` holds the guardrail's own routes (ingest and sample status, audits,
reports), `guardrail.service.health` health, readiness and metrics, `guardrail.service.proxy` the
OpenAI-compatible proxy (every other `/v1` path).  Every error has the body of
`guardrail.service.http_errors.ErrorBody`; no input produces a 5xx (a 503 means the database is
unavailable, with `Retry-After`).
"""

from __future__ import annotations

from fastapi import FastAPI

from guardrail import __version__
from guardrail.config import Settings
from guardrail.logs import RequestContextMiddleware
from guardrail.service.http_errors import install_error_contract
from guardrail.service.routes.samples import TEXT_ROOM_BYTES
from guardrail.service.runtime import Runtime

__all__ = ["API_PREFIXES", "create_app", "request_body_limit"]

# the API's own prefixes under /v1; every other /v1 path is proxied (and bounds its own body)
API_PREFIXES = frozenset({"samples", "audits", "reports"})


def _proxied(path: str) -> bool:
    return path.startswith("/v1/") and path[4:].split("/", 1)[0] not in API_PREFIXES


def request_body_limit(settings: Settings) -> int:
    """The API's request body limit: `max_request_bytes`, by default room for an image of
    `max_image_bytes` as base64 and the text fields."""
    if settings.max_request_bytes is not None:
        return settings.max_request_bytes
    return 4 * -(-settings.max_image_bytes // 3) + TEXT_ROOM_BYTES


def create_app(runtime: Runtime) -> FastAPI:
    """The sidecar's app: the guardrail's routes (behind bearer tokens when `api_tokens` are
    set), health and metrics, and the proxy last (the guardrail's own routes win)."""
    from guardrail.service.health import add_health_routes
    from guardrail.service.proxy import add_proxy_routes
    from guardrail.service.routes.audits import add_audit_routes
    from guardrail.service.routes.common import bearer_auth
    from guardrail.service.routes.reports import add_report_routes
    from guardrail.service.routes.samples import add_sample_routes

    settings = runtime.settings
    app = FastAPI(
        title="eagle-guardrail",
        version=__version__,
        description="Hallucination guardrail sidecar for multimodal LLMs (EAGLE attribution). "
        "Every error answers with the `ErrorBody` JSON shape.",
    )
    app.state.runtime = runtime
    install_error_contract(
        app, max_request_bytes=request_body_limit(settings), body_limit_exempt=_proxied
    )
    app.add_middleware(RequestContextMiddleware)  # outermost: every log line of a request
    auth = bearer_auth(settings)
    add_sample_routes(app, runtime, auth)
    add_audit_routes(app, runtime, auth)
    add_report_routes(app, runtime, auth)
    add_health_routes(app, runtime)
    add_proxy_routes(app, runtime)  # last: the guardrail's own routes take precedence
    return app
