"""The proxy end to end: the reference upstream and the sidecar as real HTTP servers, driven by
the official `openai` client; streaming and not; fail-open when ingest breaks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from detectors.reference import MODEL_DIR
from guardrail.config import load_settings
from guardrail.demo.background_server import BackgroundServer
from guardrail.reference.upstream import create_upstream_app
from guardrail.service.api import create_app
from guardrail.service.chat import image_messages
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.worker import Worker
from storage.engine import upgrade
from storage.models import Sample

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with BackgroundServer(create_upstream_app(MODEL_DIR)) as url:
        yield url


def _sidecar(tmp_path: Path, upstream: str) -> Runtime:
    settings = load_settings(
        environ={}, database_url=f"sqlite:///{tmp_path / 'g.db'}", upstream_url=upstream
    )
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    return runtime


def _messages() -> list[dict[str, Any]]:
    return image_messages(EXAMPLE.read_bytes(), "Describe the image.")


def _wait_for_samples(runtime: Runtime, n: int) -> None:
    deadline = time.time() + 10
    while time.time() < deadline:
        with runtime.sessions() as session:
            if session.query(Sample).count() >= n:
                return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} samples were teed to ingest")


def test_the_proxy_passes_responses_through_and_tees_them(upstream: str, tmp_path: Path) -> None:
    runtime = _sidecar(tmp_path, upstream)
    direct = OpenAI(base_url=f"{upstream}/v1", api_key="none")
    want = direct.chat.completions.create(model="reference", messages=_messages())
    with BackgroundServer(create_app(runtime)) as sidecar:
        proxied = OpenAI(base_url=f"{sidecar}/v1", api_key="none")
        got = proxied.chat.completions.create(model="reference", messages=_messages())
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.choices[0].message.content == "fork knife car clock ."
        stream = proxied.chat.completions.create(
            model="reference", messages=_messages(), stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        assert text == "fork knife car clock ."
        # plain and streamed: two samples, teed on the tee's own threads after each answer
        # went back, so wait for both before the worker looks for their jobs
        _wait_for_samples(runtime, 2)
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    assert worker.run_once() and worker.run_once()
    with runtime.sessions() as session:
        samples = session.query(Sample).all()
        assert {s.status.value for s in samples} == {"audited"}
        words = {t.word: t.verdict.label for s in samples for t in s.tokens if t.verdict}
        assert words["fork"] == "borrowed_evidence"


def test_the_proxy_fails_open_when_ingest_breaks(upstream: str, tmp_path: Path) -> None:
    runtime = _sidecar(tmp_path, upstream)
    runtime.engine.dispose()
    (tmp_path / "g.db").unlink()  # the database is gone (and unmigrated if recreated)
    with BackgroundServer(create_app(runtime)) as sidecar:
        proxied = OpenAI(base_url=f"{sidecar}/v1", api_key="none")
        got = proxied.chat.completions.create(model="reference", messages=_messages())
        assert got.choices[0].message.content == "fork knife car clock ."
        deadline = time.time() + 10
        while time.time() < deadline:
            metrics = httpx.get(f"{sidecar}/metrics").text
            if 'guardrail_proxy_fail_open_drops_total{reason="ingest_error"} 1.0' in metrics:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the drop was not counted")
        bad = httpx.post(f"{sidecar}/v1/chat/completions", json={"model": "reference"})
        assert bad.status_code == 400  # the upstream's own answer, passed through


def test_the_tee_backlog_is_bounded(upstream: str, tmp_path: Path) -> None:
    settings = load_settings(
        environ={},
        database_url=f"sqlite:///{tmp_path / 'g.db'}",
        upstream_url=upstream,
        proxy_max_pending=0,  # nothing may wait: every tee is dropped and counted
    )
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    with BackgroundServer(create_app(runtime)) as sidecar:
        proxied = OpenAI(base_url=f"{sidecar}/v1", api_key="none")
        got = proxied.chat.completions.create(model="reference", messages=_messages())
        assert got.choices[0].message.content == "fork knife car clock ."
        deadline = time.time() + 10
        while 'drops_total{reason="backlog"} 1.0' not in httpx.get(f"{sidecar}/metrics").text:
            assert time.time() < deadline, "the dropped tee was not counted"
            time.sleep(0.05)
    with runtime.sessions() as session:
        assert session.query(Sample).count() == 0
