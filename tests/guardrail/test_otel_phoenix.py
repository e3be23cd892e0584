"""The verdicts of a real audit reach a real Arize Phoenix (started here, offline, on loopback)
over OTLP/HTTP, inside the client's trace, one evaluation per audited word; read back through
Phoenix's REST API.

Needs the `test-phoenix` extra (pip install -e '.[dev,test-phoenix]'); skipped without it unless
`GUARDRAIL_REQUIRE_PHOENIX=1` (CI) makes that a failure.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from detectors import __version__ as detectors_version
from detectors.language_prior import DETECTOR_NAME
from detectors.reference import CAPTION_PROMPT
from guardrail.config import load_settings
from guardrail.service.api import create_app
from guardrail.service.images import encode_png, read_image
from guardrail.service.otel import AuditTrace, WordEvaluation, build_exporter
from guardrail.service.runtime import build_runtime
from guardrail.service.worker import Worker
from storage.engine import upgrade

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token-0001"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Arize Phoenix's server on 127.0.0.1 with a fresh SQLite database; yields its URL."""
    if importlib.util.find_spec("phoenix") is None:
        if os.environ.get("GUARDRAIL_REQUIRE_PHOENIX") == "1":
            pytest.fail("arize-phoenix is not installed: pip install -e '.[dev,test-phoenix]'")
        pytest.skip("arize-phoenix is not installed (the test-phoenix extra)")
    workdir = tmp_path_factory.mktemp("phoenix")
    port = _free_port()
    env = {
        **os.environ,
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(_free_port()),
        "PHOENIX_WORKING_DIR": str(workdir),
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    log = (workdir / "phoenix.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "phoenix.server.main", "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a cold start compiles and migrates: ~45 s here
        while True:
            if process.poll() is not None:
                pytest.fail(f"Phoenix exited: {(workdir / 'phoenix.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("Phoenix did not answer /healthz within 300 s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def _spans(phoenix: str, **params: Any) -> list[dict[str, Any]]:
    answer = httpx.get(f"{phoenix}/v1/projects/default/spans", params=params, timeout=10)
    answer.raise_for_status()
    return list(answer.json()["data"])


def _wait(
    read: Callable[[], list[dict[str, Any]]], done: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """Phoenix inserts what it receives in the background: poll until `done` (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        spans = read()
        if done(spans) or time.monotonic() > deadline:
            return spans
        time.sleep(0.25)


def _client_request(phoenix: str, *, sampled: bool = True) -> tuple[str, str, str]:
    """What the client application does: its own LLM span, exported to Phoenix; returns its
    trace id, span id and the `traceparent` header it sent."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
    from opentelemetry.trace import format_span_id, format_trace_id
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider = TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(f"{phoenix}/v1/traces")))
    tracer = provider.get_tracer("shop-app")
    with tracer.start_as_current_span(
        "ChatCompletion",
        attributes={"openinference.span.kind": "LLM", "llm.model_name": "reference"},
    ) as span:
        context = span.get_span_context()
        trace_id, span_id = format_trace_id(context.trace_id), format_span_id(context.span_id)
        headers: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(headers)
    provider.shutdown()
    traceparent = headers["traceparent"]
    assert traceparent.startswith(f"00-{trace_id}-{span_id}-")
    assert bool(int(traceparent[-2:], 16) & 1) is sampled  # the W3C sampled flag
    return trace_id, span_id, traceparent


def _check_evaluations(span: dict[str, Any], tokens: list[dict[str, Any]]) -> None:
    """One `gen_ai.evaluation.result` per audited word, with its verdict's label and score."""
    events = [e for e in span["events"] if e["name"] == "gen_ai.evaluation.result"]
    assert len(events) == len(span["events"]) == len(tokens) > 0
    got = {
        e["attributes"]["guardrail.token.position"]: (
            e["attributes"]["guardrail.word"],
            e["attributes"]["gen_ai.evaluation.name"],
            e["attributes"]["gen_ai.evaluation.score.label"],
            e["attributes"]["gen_ai.evaluation.score.value"],
            e["attributes"]["gen_ai.evaluation.explanation"],
        )
        for e in events
    }
    assert got == {
        t["position"]: (
            t["word"],
            "hallucination",
            t["verdict"]["label"],
            pytest.approx(t["verdict"]["hallucination_score"], abs=1e-12),
            t["verdict"]["reason"],
        )
        for t in tokens
    }


def test_a_real_audit_shows_in_phoenix_inside_the_client_trace(
    phoenix: str, tmp_path: Path
) -> None:
    runtime = build_runtime(
        load_settings(
            environ={},
            database_url=f"sqlite:///{tmp_path / 'g.db'}",
            api_tokens=[TOKEN],
            otel_endpoint=phoenix,
            otel_schedule_delay_seconds=0.2,
        )
    )
    upgrade(runtime.engine)
    client = TestClient(create_app(runtime))
    trace_id, client_span_id, traceparent = _client_request(phoenix)

    # the sample as the proxy would hand it over: X-Request-Id and the W3C traceparent header
    image = base64.b64encode(encode_png(read_image(EXAMPLE))).decode()
    body = {
        "model": "reference",
        "prompt": CAPTION_PROMPT,
        "output": "fork knife car clock .",
        "image_base64": image,
        "request_id": "req-phoenix-1",
    }
    answer = client.post("/v1/samples", json=body, headers={**AUTH, "traceparent": traceparent})
    assert answer.status_code == 202, answer.text
    sample_id = answer.json()["id"]
    exporter = build_exporter(runtime.settings, runtime.metrics)
    assert exporter is not None
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics, exporter=exporter)
    assert worker.run_once() is True
    exporter.shutdown()  # what a stopping worker does: the queued span goes out
    view = client.get(f"/v1/samples/{sample_id}", headers=AUTH).json()
    assert view["status"] == "audited"
    tokens = view["tokens"]
    assert {t["word"] for t in tokens} == {"fork", "knife", "car", "clock"}
    exported = runtime.metrics.registry.get_sample_value(
        "guardrail_otel_spans_total", {"outcome": "exported"}
    )
    assert exported == 1

    found = _wait(
        lambda: _spans(phoenix, attribute=f"guardrail.sample.id:{json.dumps(sample_id)}"),
        lambda spans: len(spans) == 1,
    )
    assert len(found) == 1, found
    span = found[0]
    assert span["name"] == "guardrail.audit" and span["span_kind"] == "EVALUATOR"
    assert span["attributes"]["guardrail.request.id"] == "req-phoenix-1"
    assert span["attributes"]["guardrail.words.audited"] == 4
    _check_evaluations(span, tokens)
    # the sample stores the client's trace context: the verdict span is in the client's trace
    assert view["traceparent"] == traceparent
    assert span["context"]["trace_id"] == trace_id
    assert span["parent_id"] == client_span_id
    trace = _spans(phoenix, trace_id=trace_id)
    assert {s["name"] for s in trace} == {"ChatCompletion", "guardrail.audit"}

    # the same verdicts with the correlation keys the proxy stores: a second client request,
    # not sampled by the client (flags 00), answered with a chatcmpl id as its choice 1
    trace_id, client_span_id, traceparent = _client_request(phoenix, sampled=False)
    words = [
        WordEvaluation(
            word=t["word"],
            position=t["position"],
            category=t["category"],
            label=t["verdict"]["label"],
            hallucination_score=t["verdict"]["hallucination_score"],
            reason=t["verdict"]["reason"],
            detector=DETECTOR_NAME,
            detector_version=detectors_version,
        )
        for t in tokens
    ]
    exporter = build_exporter(runtime.settings, runtime.metrics)
    assert exporter is not None
    exporter.export(
        AuditTrace(
            sample_id=sample_id,
            model="reference",
            request_id="req-phoenix-2",
            traceparent=traceparent,
            response_id="chatcmpl-phoenix-2",
            choice_index=1,
        ),
        words,
    )
    exporter.shutdown()
    # the client's own span was not sampled, so Phoenix holds only the verdict in that trace
    trace = _wait(lambda: _spans(phoenix, trace_id=trace_id), lambda spans: len(spans) == 1)
    assert [s["name"] for s in trace] == ["guardrail.audit"]
    span = trace[0]
    assert span["parent_id"] == client_span_id
    assert span["attributes"]["gen_ai.response.id"] == "chatcmpl-phoenix-2"
    assert span["attributes"]["guardrail.choice.index"] == 1
    _check_evaluations(span, tokens)
    assert all(
        e["attributes"]["gen_ai.response.id"] == "chatcmpl-phoenix-2" for e in span["events"]
    )
