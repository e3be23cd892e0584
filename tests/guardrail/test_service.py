"""The sidecar end to end: config, ingest over HTTP, the worker, results, auth, bad input."""

from __future__ import annotations

import base64
import io
import json
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import detectors
from detectors.language_prior import DETECTOR_NAME
from detectors.reference import CAPTION_PROMPT, MODEL_DIR
from guardrail.cli import main
from guardrail.config import ConfigError, load_settings
from guardrail.service.api import create_app
from guardrail.service.images import encode_png, read_image
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.worker import Worker
from storage import queue
from storage.engine import upgrade
from storage.models import AttributionRecord, Job, JobStatus, Sample, VerdictRecord, utcnow

TOKEN = "s3cret-token-0001"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _runtime(tmp_path: Path, **overrides: object) -> Runtime:
    settings = load_settings(
        environ={},
        database_url=f"sqlite:///{tmp_path / 'g.db'}",
        api_tokens=[TOKEN],
        **overrides,
    )
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    return runtime


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"
OUTPUT = "fork knife car clock ."  # what the shipped model says about it


def _trap() -> tuple[np.ndarray, str]:
    image = read_image(EXAMPLE)
    return image, base64.b64encode(encode_png(image)).decode()


def _body(image_b64: str, **extra: object) -> dict[str, object]:
    return {
        "model": "reference",
        "prompt": CAPTION_PROMPT,
        "output": OUTPUT,
        "image_base64": image_b64,
        **extra,
    }


def test_config_names_bad_keys_and_reads_toml(tmp_path: Path) -> None:
    toml = tmp_path / "guardrail.toml"
    toml.write_text(
        f'database_url = "sqlite:///{tmp_path}/x.db"\nstore_raw = true\n'
        f'[[models]]\nname = "ref"\npath = "{MODEL_DIR}"\nsample_rate = 0.5\n'
    )
    settings = load_settings(toml, environ={"GUARDRAIL_PORT": "9000"})
    assert settings.store_raw and settings.port == 9000
    assert [m.name for m in settings.models] == ["ref"] and settings.models[0].sample_rate == 0.5
    with pytest.raises(ConfigError, match=r"models\.0\.sample_rate"):
        load_settings(
            environ={
                "GUARDRAIL_MODELS": json.dumps(
                    [{"name": "a", "path": str(MODEL_DIR), "sample_rate": 2}]
                )
            }
        )
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_config_check_masks_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARDRAIL_DATABASE_URL", "postgresql+psycopg://u:hunter2@db/guardrail")
    monkeypatch.setenv("GUARDRAIL_API_TOKENS", json.dumps(["abcdefgh-token-9876", "tok1"]))
    assert main(["config", "check"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "abcdefgh" not in out and "****9876" in out
    assert "tok1" not in out  # a short token is not shown at all


def test_a_trap_sample_is_ingested_audited_and_reported(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    client = TestClient(create_app(runtime))
    _, image_b64 = _trap()
    answer = client.post("/v1/samples", json=_body(image_b64, request_id="r-1"), headers=AUTH)
    assert answer.status_code == 202, answer.text
    sample_id = answer.json()["id"]
    assert client.get(f"/v1/samples/{sample_id}", headers=AUTH).json()["status"] == "queued"
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    assert worker.run_once() is True
    assert worker.run_once() is False  # exactly one job
    view = client.get(f"/v1/samples/{sample_id}", headers=AUTH).json()
    assert view["status"] == "audited"
    labels = {t["word"]: t["verdict"]["label"] for t in view["tokens"]}
    assert set(labels) == {"fork", "knife", "car", "clock"}
    assert labels["fork"] == "borrowed_evidence" and labels["knife"] == "grounded"
    assert view["tokens"][0]["attribution"]["scorer"].startswith("llava-fast(")
    audits = client.get("/v1/audits", params={"verdict": "borrowed_evidence"}, headers=AUTH)
    assert [a["word"] for a in audits.json()["audits"]] == ["fork"]
    metrics = client.get("/metrics").text
    fork = 'category="fork",model="reference",verdict="borrowed_evidence"'
    assert f"guardrail_tokens_audited_total{{{fork}}} 1.0" in metrics
    assert 'guardrail_samples_sampled_total{model="reference"} 1.0' in metrics
    with runtime.sessions() as session:  # store_raw is off: no image or prompt kept
        sample = session.get(Sample, sample_id)
        job = session.query(Job).one()
        assert sample is not None and sample.image_data is None and sample.prompt is None
        assert job.status is JobStatus.DONE and job.image_data is None
        verdicts = session.query(VerdictRecord).all()
        attributions = session.query(AttributionRecord).all()
    # every stored verdict and attribution names what produced it
    calibration = runtime.auditors["reference"].load().calibration
    assert calibration.id.startswith("cal-")
    assert {(v.detector, v.detector_version, v.thresholds_id) for v in verdicts} == {
        (DETECTOR_NAME, detectors.__version__, calibration.id)
    }
    assert {v.scorer_name for v in verdicts} == {a.scorer_name for a in attributions}
    assert {(a.search_version, a.weight_insight, a.weight_necessity) for a in attributions} == {
        (detectors.__version__, 1.0, 1.0)
    }
    token = view["tokens"][0]  # and the API shows it
    assert token["verdict"]["thresholds_id"] == calibration.id
    assert token["verdict"]["detector_version"] == detectors.__version__
    assert token["attribution"]["weights"] == [1.0, 1.0]


def test_bad_input_gets_a_clear_4xx_and_auth_is_enforced(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    client = TestClient(create_app(runtime))
    _, image_b64 = _trap()
    assert client.post("/v1/samples", json=_body(image_b64)).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    assert client.post("/v1/samples", json=_body(image_b64), headers=bad).status_code == 403
    assert client.get("/healthz").status_code == 200
    cases = [
        (_body("!!!not base64"), 422, "base64"),
        (_body(base64.b64encode(b"not an image").decode()), 415, "PNG, JPEG or WebP"),
        (_body(image_b64, model="gpt-9"), 404, "not configured"),
        (_body(image_b64, prompt="describe it"), 422, "placeholder"),
        ({**_body(image_b64), "output": None}, 422, "output"),
        ({**_body(image_b64), "surprise": 1}, 422, "surprise"),
    ]
    for body, status, words in cases:
        answer = client.post("/v1/samples", json=body, headers=AUTH)
        assert answer.status_code == status, (body.get("model"), answer.text)
        assert words in answer.text
    with runtime.sessions() as session:
        assert session.query(Sample).count() == 0


def test_sampling_is_deterministic_and_forced_audits_pass(tmp_path: Path) -> None:
    models = [{"name": "reference", "path": str(MODEL_DIR), "sample_rate": 0.0}]
    runtime = _runtime(tmp_path, models=models)
    client = TestClient(create_app(runtime))
    _, image_b64 = _trap()
    skipped = client.post("/v1/samples", json=_body(image_b64), headers=AUTH)
    assert skipped.status_code == 200 and skipped.json() == {"sampled": False, "reason": "rate"}
    forced = client.post(
        "/v1/samples", json=_body(image_b64), headers={**AUTH, "X-Guardrail-Audit": "always"}
    )
    assert forced.status_code == 202 and forced.json()["reason"] == "forced"
    assert 'reason="rate"} 1.0' in client.get("/metrics").text


def test_a_killed_workers_job_is_audited_exactly_once(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    client = TestClient(create_app(runtime))
    _, image_b64 = _trap()
    sample_id = client.post("/v1/samples", json=_body(image_b64), headers=AUTH).json()["id"]
    with runtime.sessions.begin() as session:  # a worker claims it, then dies (kill -9)
        assert queue.claim(session, "dead-worker", lease_seconds=60) is not None
    survivor = Worker(runtime.sessions, runtime.auditors, runtime.metrics, lease_seconds=30)
    assert survivor.run_once() is False  # still leased
    survivor.clock = lambda: utcnow() + timedelta(seconds=61)  # the dead worker's lease ran out
    assert survivor.run_once() is True
    with runtime.sessions.begin() as session:
        assert not queue.complete(session, 1, "dead-worker")  # its late result is refused
    view = client.get(f"/v1/samples/{sample_id}", headers=AUTH).json()
    assert view["status"] == "audited" and len(view["tokens"]) == 4


def test_ingest_readiness_reports_an_unmigrated_database_and_the_proxy_stays_ready(
    tmp_path: Path,
) -> None:
    settings = load_settings(environ={}, database_url=f"sqlite:///{tmp_path / 'fresh.db'}")
    client = TestClient(create_app(build_runtime(settings)))
    answer = client.get("/readyz/ingest")
    assert answer.status_code == 503 and "guardrail db upgrade" in answer.text
    assert client.get("/readyz").status_code == 200  # the proxy does not need the database
    assert client.get("/healthz").status_code == 200
    assert "/v1/samples" in client.get("/openapi.json").json()["paths"]


def test_multipart_upload_and_store_raw(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, store_raw=True)
    client = TestClient(create_app(runtime))
    png = EXAMPLE.read_bytes()
    answer = client.post(
        "/v1/samples/upload",
        files={"image": ("trap.png", png, "image/png")},
        data={"model": "reference", "prompt": CAPTION_PROMPT, "output": OUTPUT},
        headers=AUTH,
    )
    assert answer.status_code == 202, answer.text
    with runtime.sessions() as session:
        sample = session.get(Sample, answer.json()["id"])
        assert sample is not None and sample.image_data == png and sample.prompt == CAPTION_PROMPT
    bad = client.post(
        "/v1/samples/upload",
        files={"image": ("trap.png", png, "image/png")},
        data={"model": "reference", "prompt": CAPTION_PROMPT, "token_ids": "[1, 2"},
        headers=AUTH,
    )
    assert bad.status_code == 422 and "token_ids" in bad.text


def test_sampler_rate_is_deterministic_and_capped_per_minute() -> None:
    from guardrail.config import ModelSettings
    from guardrail.service.sampling import Sampler

    now = [0.0]
    half = ModelSettings(name="m", path=MODEL_DIR, sample_rate=0.5, max_audits_per_minute=3)
    sampler = Sampler({"m": half}, clock=lambda: now[0])
    keys = [f"request-{i}".encode() for i in range(400)]
    first = [Sampler.fraction(k) < 0.5 for k in keys]
    assert 0.4 < sum(first) / len(first) < 0.6
    assert first == [Sampler.fraction(k) < 0.5 for k in keys]  # the same request, same answer
    picked = [k for k, f in zip(keys, first, strict=True) if f][:5]
    decisions = [sampler.decide("m", k) for k in picked]
    assert [d.reason for d in decisions] == ["sampled"] * 3 + ["rate_limited"] * 2
    now[0] = 61.0
    assert sampler.decide("m", picked[3]).sampled


def test_serve_refuses_an_unmigrated_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from guardrail.demo.background_server import free_port

    monkeypatch.setenv("GUARDRAIL_DATABASE_URL", f"sqlite:///{tmp_path / 'new.db'}")
    port = free_port()
    assert main(["serve", "--workers", "0", "--port", str(port)]) == 2
    assert "guardrail db upgrade" in capsys.readouterr().err
    with socket.socket() as again:  # the refused start let go of its port
        again.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"output": None, "token_ids": [10**6, 3]}, "failed", "do not decode"),
        ({"output": " ".join(["cup"] * 150)}, "failed", "positions"),
        ({"output": "a ball ."}, "audited", None),
        ({"output": "nothing to see here ."}, "audited", None),
    ],
)
def test_problems_only_the_worker_sees_are_stored_as_failed_with_the_reason(
    tmp_path: Path, body: dict[str, object], status: str, error: str | None
) -> None:
    runtime = _runtime(tmp_path)
    client = TestClient(create_app(runtime))
    _, image_b64 = _trap()
    answer = client.post("/v1/samples", json={**_body(image_b64), **body}, headers=AUTH)
    assert answer.status_code == 202, answer.text
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    assert worker.run_once()
    assert not worker.run_once()  # input errors are not retried
    view = client.get(f"/v1/samples/{answer.json()['id']}", headers=AUTH).json()
    assert view["status"] == status
    if error is None:
        assert view["job"]["error"] is None
    else:
        assert error in view["job"]["error"] and view["job"]["attempts"] == 1


def test_images_that_are_not_images_get_a_4xx(tmp_path: Path) -> None:
    from PIL import Image

    runtime = _runtime(tmp_path)
    client = TestClient(create_app(runtime))
    png = EXAMPLE.read_bytes()
    bomb = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(bomb, format="PNG")  # 144 Mpx, a few hundred kB
    for data, status, kind, words in [
        (png[: len(png) // 2], 422, "invalid_image", "truncated"),
        (bomb.getvalue(), 413, "payload_too_large", "pixels"),
        (b"GIF89a" + b"\0" * 20, 415, "unsupported_media_type", "GIF"),
    ]:
        body = _body(base64.b64encode(data).decode())
        answer = client.post("/v1/samples", json=body, headers=AUTH)
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert error["type"] == kind and words in error["message"], error
    malformed = client.post(
        "/v1/samples", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert malformed.status_code == 422
    assert malformed.json()["error"]["type"] == "invalid_request"
