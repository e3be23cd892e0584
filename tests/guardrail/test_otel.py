"""OpenTelemetry export of verdicts: what goes on the wire (decoded by a loopback OTLP receiver),
the trace it joins, counted failures, the bounded queue, the stop flush, the settings."""

from __future__ import annotations

import base64
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from detectors.reference import CAPTION_PROMPT
from guardrail.cli import main
from guardrail.config import ConfigError, Settings, load_settings, masked
from guardrail.service.api import create_app
from guardrail.service.images import encode_png, read_image
from guardrail.service.metrics import Metrics
from guardrail.service.otel import AuditTrace, WordEvaluation, build_exporter, traces_url
from guardrail.service.runtime import build_runtime
from guardrail.service.worker import Worker
from storage.engine import upgrade
from tests.guardrail.otlp_receiver import otlp_receiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TOKEN = "s3cret-token-0001"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"

WORDS = (
    WordEvaluation(
        word="fork",
        position=1,
        category="fork",
        label="borrowed_evidence",
        hallucination_score=0.83,
        reason="its evidence is the knife's region",
        detector="eagle-rules",
        detector_version="1",
    ),
    WordEvaluation(
        word="knife",
        position=2,
        category="knife",
        label="grounded",
        hallucination_score=0.04,
        reason="its own region carries it",
        detector="eagle-rules",
        detector_version="1",
    ),
)


def _settings(endpoint: str, **overrides: Any) -> Settings:
    return load_settings(environ={}, otel_endpoint=endpoint, **overrides)


def _sample_value(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("guardrail_otel_spans_total", {"outcome": outcome})
    return value or 0.0


def test_a_verdict_span_joins_the_request_trace_with_one_evaluation_per_word() -> None:
    with otlp_receiver() as receiver:
        settings = _settings(
            receiver.url,
            otel_headers={"Authorization": "Basic cGs6c2s="},
            otel_resource_attributes={"openinference.project.name": "shop"},
        )
        metrics = Metrics.create()
        exporter = build_exporter(settings, metrics)
        assert exporter is not None
        # the client did not sample its request (flags 00): the verdict is exported all the same
        exporter.export(
            AuditTrace(
                sample_id="s1",
                model="reference",
                request_id="req-1",
                traceparent=f"00-{TRACE_ID}-{PARENT_ID}-00",
                response_id="chatcmpl-abc",
                choice_index=1,
            ),
            WORDS,
            forward_passes=120,
        )
        exporter.export(AuditTrace(sample_id="s2", model="reference", request_id="req-2"), WORDS)
        exporter.export(  # a malformed traceparent starts a new trace too
            AuditTrace(sample_id="s3", model="reference", traceparent="00-zz-yy-01"), WORDS[:1]
        )
        exporter.shutdown()
        assert receiver.requests[0]["authorization"] == "Basic cGs6c2s="
        assert receiver.requests[0]["content-type"] == "application/x-protobuf"
    spans = {s.attributes["guardrail.sample.id"]: s for s in receiver.spans}
    assert set(spans) == {"s1", "s2", "s3"}
    joined, new, malformed = spans["s1"], spans["s2"], spans["s3"]
    assert joined.name == "guardrail.audit"
    assert (joined.trace_id, joined.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert joined.resource["service.name"] == "eagle-guardrail"
    assert joined.resource["openinference.project.name"] == "shop"
    assert joined.attributes["openinference.span.kind"] == "EVALUATOR"
    assert joined.attributes["langfuse.observation.type"] == "evaluator"
    assert joined.attributes["gen_ai.response.id"] == "chatcmpl-abc"
    assert joined.attributes["guardrail.request.id"] == "req-1"
    assert joined.attributes["guardrail.choice.index"] == 1
    assert joined.attributes["guardrail.forward_passes"] == 120
    assert joined.attributes["guardrail.words.flagged"] == 1
    assert [name for name, _ in joined.events] == ["gen_ai.evaluation.result"] * 2
    fork = joined.events[0][1]
    assert fork == {
        "gen_ai.evaluation.name": "hallucination",
        "gen_ai.evaluation.score.value": 0.83,
        "gen_ai.evaluation.score.label": "borrowed_evidence",
        "gen_ai.evaluation.explanation": "its evidence is the knife's region",
        "gen_ai.response.id": "chatcmpl-abc",
        "guardrail.word": "fork",
        "guardrail.token.position": 1,
        "guardrail.word.category": "fork",
        "guardrail.detector": "eagle-rules",
        "guardrail.detector.version": "1",
    }
    assert new.parent_span_id is None and new.trace_id not in (TRACE_ID, joined.trace_id)
    assert new.attributes["guardrail.request.id"] == "req-2"
    assert "gen_ai.response.id" not in new.attributes
    assert "gen_ai.response.id" not in new.events[0][1]
    assert malformed.parent_span_id is None and len(malformed.events) == 1
    assert _sample_value(metrics, "exported") == 3
    assert _sample_value(metrics, "failed") == 0


def test_refused_exports_a_full_queue_and_a_cut_short_stop_are_counted() -> None:
    with otlp_receiver() as receiver:
        receiver.status = 400  # not retryable: the exporter gives up at once
        metrics = Metrics.create()
        exporter = build_exporter(_settings(receiver.url), metrics)
        assert exporter is not None
        exporter.export(AuditTrace(sample_id="s1", model="reference"), WORDS)
        assert exporter.flush()
        assert _sample_value(metrics, "failed") == 1
        exporter.shutdown()

    with otlp_receiver() as receiver:
        receiver.hold = threading.Event()  # the receiver answers nothing until released
        metrics = Metrics.create()
        settings = _settings(
            receiver.url,
            otel_max_queue_spans=1,
            otel_max_batch_spans=1,
            otel_timeout_seconds=10,
        )
        exporter = build_exporter(settings, metrics)
        assert exporter is not None
        exporter.flush_seconds = 0.3  # the stop flush, shorter than the held export
        exporter.export(AuditTrace(sample_id="a", model="reference"), WORDS)
        assert receiver.arrived.wait(10)  # span a is on the wire, held
        exporter.export(AuditTrace(sample_id="b", model="reference"), WORDS)  # queued
        exporter.export(AuditTrace(sample_id="c", model="reference"), WORDS)  # over the bound
        assert _sample_value(metrics, "queue_full") == 1
        exporter.shutdown()  # a is still held: b cannot go within the flush
        assert _sample_value(metrics, "stopped") == 1
        exporter.export(AuditTrace(sample_id="d", model="reference"), WORDS)
        assert _sample_value(metrics, "stopped") == 2
        receiver.hold.set()


def test_an_unreachable_receiver_never_fails_the_audit(tmp_path: Path) -> None:
    with otlp_receiver() as receiver:
        url = receiver.url  # closed when the block ends: nothing listens there any more
    runtime = build_runtime(
        load_settings(
            environ={},
            database_url=f"sqlite:///{tmp_path / 'g.db'}",
            api_tokens=[TOKEN],
            otel_endpoint=url,
            otel_timeout_seconds=1.0,
        )
    )
    upgrade(runtime.engine)
    client = TestClient(create_app(runtime))
    image = base64.b64encode(encode_png(read_image(EXAMPLE))).decode()
    body = {"model": "reference", "prompt": CAPTION_PROMPT, "output": "fork knife car clock ."}
    answer = client.post("/v1/samples", json={**body, "image_base64": image}, headers=AUTH)
    assert answer.status_code == 202, answer.text
    exporter = build_exporter(runtime.settings, runtime.metrics)
    assert exporter is not None
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics, exporter=exporter)
    assert worker.run_once() is True
    sample = client.get(f"/v1/samples/{answer.json()['id']}", headers=AUTH).json()
    assert sample["status"] == "audited" and len(sample["tokens"]) == 4
    exporter.flush(10)
    exporter.shutdown()
    assert _sample_value(runtime.metrics, "failed") == 1
    assert "guardrail_otel_spans_total" in client.get("/metrics").text


def test_the_settings_validate_the_endpoint_and_mask_the_headers() -> None:
    settings = _settings(
        "https://user:pw@cloud.langfuse.com/api/public/otel",
        otel_headers={"Authorization": "Basic c2VjcmV0"},
    )
    shown = masked(settings)
    assert shown["otel_headers"] == {"Authorization": "****"}
    assert "pw" not in shown["otel_endpoint"] and "c2VjcmV0" not in str(shown)
    assert traces_url("https://cloud.langfuse.com/api/public/otel") == (
        "https://cloud.langfuse.com/api/public/otel/v1/traces"
    )
    assert traces_url("http://127.0.0.1:6006/v1/traces/") == "http://127.0.0.1:6006/v1/traces"
    assert build_exporter(load_settings(environ={}), Metrics.create()) is None  # off by default
    with pytest.raises(ConfigError, match=r"otel_endpoint: .*expected an http"):
        _settings("grpc://collector:4317")
    with pytest.raises(ConfigError, match=r"otel_headers: .*line break"):
        _settings("http://127.0.0.1:4318", otel_headers={"Authorization": "Basic x\r\nX-Evil: 1"})
    with pytest.raises(ConfigError, match=r"otel_headers: .*not an HTTP header name"):
        _settings("http://127.0.0.1:4318", otel_headers={"Bad Name": "1"})
    env = {"GUARDRAIL_OTEL_HEADERS": '{"x-langfuse-ingestion-version": "4"}'}
    settings = load_settings(environ={**env, "GUARDRAIL_OTEL_ENDPOINT": "http://127.0.0.1:4318"})
    assert settings.otel_headers["x-langfuse-ingestion-version"].get_secret_value() == "4"


def test_without_the_otel_extra_the_sidecar_refuses_to_start_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # what an install without the extra looks like to `import`
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError, match=r"install the `otel` extra"):
        _settings("http://127.0.0.1:4318")
    monkeypatch.setenv("GUARDRAIL_OTEL_ENDPOINT", "http://127.0.0.1:4318")
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("ConfigError: ") and "eagle-guardrail[otel]" in err


def test_the_base_install_never_imports_opentelemetry() -> None:
    import subprocess

    code = (
        "import sys, guardrail.service.worker, guardrail.service.children;"
        "import guardrail.service.otel, guardrail.config;"
        "guardrail.config.load_settings(environ={});"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_otel_api_is_pinned() -> None:
    import guardrail.service.otel

    assert sorted(guardrail.service.otel.__all__) == sorted(
        [
            "EVALUATION_EVENT",
            "EVALUATION_NAME",
            "OTEL_EXTRA_MISSING",
            "SPAN_NAME",
            "SPAN_OUTCOMES",
            "AuditTrace",
            "WordEvaluation",
            "audit_trace",
            "build_exporter",
            "otel_installed",
            "traces_url",
            "word_evaluations",
        ]
    )


@pytest.mark.slow
def test_serve_exports_from_its_worker_process_and_flushes_on_a_graceful_stop(
    tmp_path: Path,
) -> None:
    import os
    import signal
    import time

    import httpx

    from guardrail.demo.background_server import free_port, spawn_guardrail
    from storage.engine import make_engine

    url = f"sqlite:///{tmp_path / 'g.db'}"
    upgrade(make_engine(url))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with otlp_receiver() as receiver:
        env = {
            "GUARDRAIL_DATABASE_URL": url,
            "GUARDRAIL_API_TOKENS": f'["{TOKEN}"]',
            "GUARDRAIL_WORKERS": "1",
            "GUARDRAIL_SCHEDULER": "false",
            "GUARDRAIL_TORCH_THREADS": "1",
            "GUARDRAIL_OTEL_ENDPOINT": receiver.url,
            # nothing is sent on a schedule within the test: only the stop's flush sends it
            "GUARDRAIL_OTEL_SCHEDULE_DELAY_SECONDS": "600",
        }
        serve = spawn_guardrail(["serve", "--port", str(port)], env, f"{base}/readyz", timeout=120)
        try:
            image = base64.b64encode(encode_png(read_image(EXAMPLE))).decode()
            body = {
                "model": "reference",
                "prompt": CAPTION_PROMPT,
                "output": "fork knife car clock .",
                "image_base64": image,
                "request_id": "req-serve",
            }
            answer = httpx.post(f"{base}/v1/samples", json=body, headers=AUTH, timeout=30)
            assert answer.status_code == 202, answer.text
            sample = f"{base}/v1/samples/{answer.json()['id']}"
            deadline = time.monotonic() + 300
            while httpx.get(sample, headers=AUTH, timeout=10).json()["status"] != "audited":
                assert time.monotonic() < deadline, "the sample was not audited within 300 s"
                time.sleep(0.5)
            # the child's counters reach the parent's /metrics: the span waits in the queue
            time.sleep(1.5)
            metrics = httpx.get(f"{base}/metrics", timeout=10).text
            assert 'guardrail_otel_spans_total{outcome="exported"} 0.0' in metrics
            assert receiver.spans == []
        finally:
            os.kill(serve.pid, signal.SIGTERM)
            assert serve.wait(120) == 0
    assert len(receiver.spans) == 1
    span = receiver.spans[0]
    assert span.attributes["guardrail.request.id"] == "req-serve"
    assert [e["guardrail.word"] for _, e in span.events] == ["fork", "knife", "car", "clock"]


def test_the_export_benchmark_prints_json() -> None:
    import json
    import subprocess

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "otel_export.py"
    out = subprocess.run(
        [sys.executable, str(script), "--spans", "5", "--words", "0", "3", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.stdout)["rows"]
    assert [(r["words"], r["exported"]) for r in rows] == [(0, 5), (3, 5)]
    assert rows[1]["bytes_per_span"] > rows[0]["bytes_per_span"] > 0
