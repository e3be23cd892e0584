"""Fuzz the API from its own OpenAPI schema (schemathesis): no input may produce a 5xx, and
every error answers in the one JSON shape (`guardrail.service.http_errors.ErrorBody`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from guardrail.config import load_settings
from guardrail.service.api import create_app
from guardrail.service.runtime import build_runtime
from storage.engine import upgrade


def _app(tmp: Path) -> object:
    runtime = build_runtime(
        load_settings(environ={}, database_url=f"sqlite:///{tmp / 'fuzz.db'}", api_tokens=["t"])
    )
    upgrade(runtime.engine)
    return create_app(runtime)


schema = schemathesis.openapi.from_asgi(
    "/openapi.json", _app(Path(tempfile.mkdtemp(prefix="guardrail-fuzz-")))
)


# the proxy forwards to an upstream (its own tests); the readiness probes answer 503 by design
@schema.exclude(path="/v1/chat/completions").exclude(path_regex="^/readyz").parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_api_fail(case: schemathesis.Case) -> None:
    for headers in ({"Authorization": "Bearer t"}, {}):
        response = case.call(headers=headers)
        case.validate_response(response, checks=[not_a_server_error])
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"}, body
            assert set(body["error"]) <= {"type", "message", "details"}, body
            assert body["error"]["type"] and body["error"]["message"], body
