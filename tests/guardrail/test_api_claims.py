"""What the README says of the API, each claim asserted: every authenticated GET refuses a
request without a token, and `/v1/audits` filters by model, verdict and time, newest first,
up to `limit`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from guardrail.config import load_settings
from guardrail.service.api import create_app
from guardrail.service.runtime import Runtime, build_runtime
from storage.engine import upgrade
from tests.guardrail.test_scheduler import _audited

TOKEN = "claims-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    tmp: Path = tmp_path_factory.mktemp("api-claims")
    settings = load_settings(
        environ={}, database_url=f"sqlite:///{tmp / 'g.db'}", api_tokens=[TOKEN]
    )
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    # an hour apart: a's two words, then b's, then a's grounded word
    _audited(runtime, T0, ["language_prior", "grounded"], word="cup", model="a")
    _audited(runtime, T0 + timedelta(hours=1), ["borrowed_evidence"], word="fork", model="b")
    _audited(runtime, T0 + timedelta(hours=2), ["grounded"], word="knife", model="a")
    return runtime


@pytest.fixture(scope="module")
def client(runtime: Runtime) -> TestClient:
    return TestClient(create_app(runtime))


def test_every_authenticated_get_refuses_a_request_without_a_token(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    secured = [
        path
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if method == "get" and operation.get("security")
    ]
    assert {"/v1/audits", "/v1/reports", "/v1/samples/{sample_id}"} <= set(secured)
    for path in secured:
        concrete = re.sub(r"\{[^}]+\}", "ab" * 16, path)
        got = client.get(concrete)
        assert got.status_code == 401, (path, got.text)
        assert got.json()["error"]["type"] == "unauthorized"
        assert got.headers["WWW-Authenticate"] == "Bearer"
        assert client.get(concrete, headers=AUTH).status_code in {200, 404}  # the token opens it


def _audits(client: TestClient, **params: str | int) -> list[tuple[str, str, str]]:
    got = client.get("/v1/audits", params=params, headers=AUTH)
    assert got.status_code == 200, got.text
    return [(a["model"], a["word"], a["verdict"]) for a in got.json()["audits"]]


def test_audits_filter_by_model_verdict_and_time_newest_first(client: TestClient) -> None:
    everything = [
        ("a", "knife", "grounded"),
        ("b", "fork", "borrowed_evidence"),
        ("a", "cup", "language_prior"),
        ("a", "cup", "grounded"),
    ]
    assert _audits(client) == everything  # newest sample first, then by position
    assert _audits(client, model="a") == [everything[0], *everything[2:]]
    assert _audits(client, model="nobody") == []
    assert _audits(client, verdict="grounded") == [everything[0], everything[3]]
    assert _audits(client, model="a", verdict="language_prior") == [everything[2]]
    hour = T0 + timedelta(hours=1)
    assert _audits(client, since=hour.isoformat()) == everything[:2]  # since is inclusive
    assert _audits(client, until=hour.isoformat()) == everything[2:]  # until is exclusive
    window = {"since": T0.isoformat(), "until": (T0 + timedelta(hours=2)).isoformat()}
    assert _audits(client, **window) == everything[1:]
    assert _audits(client, limit=1) == everything[:1]
    assert _audits(client, limit=3) == everything[:3]
