"""Fuzz the API from its own OpenAPI schema (schemathesis): no input may produce a 500."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from guardrail.api import create_app
from guardrail.config import load_settings
from guardrail.runtime import build_runtime
from storage.engine import upgrade


def _app(tmp: Path) -> object:
    runtime = build_runtime(
        load_settings(environ={}, database_url=f"sqlite:///{tmp / 'fuzz.db'}", api_tokens=["t"])
    )
    upgrade(runtime.engine)
    return create_app(runtime)


_TMP = Path(__import__("tempfile").mkdtemp(prefix="guardrail-fuzz-"))
schema = schemathesis.openapi.from_asgi("/openapi.json", _app(_TMP))


@schema.exclude(path="/v1/chat/completions").parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_makes_the_api_fail(case: schemathesis.Case) -> None:
    for headers in ({"Authorization": "Bearer t"}, {}):
        response = case.call(headers=headers)
        case.validate_response(response, checks=[not_a_server_error])
