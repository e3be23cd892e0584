"""Workers that die and workers that race: every accepted sample is audited exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from detectors.reference import CAPTION_PROMPT, MODEL_DIR, SceneKind, generate_scene
from guardrail.config import load_settings
from guardrail.service.images import encode_png
from guardrail.service.ingest import IngestRequest, ingest
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.worker import Worker
from storage.engine import upgrade
from storage.models import FlaggedToken, Job, JobStatus, Sample
from tests.postgres import schema_url

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"


def _ingest(runtime: Runtime, image_png: bytes, output: str, request_id: str) -> str:
    answer = ingest(
        runtime,
        IngestRequest(
            model="reference",
            prompt=CAPTION_PROMPT,
            image_bytes=image_png,
            output=output,
            request_id=request_id,
        ),
    )
    assert answer["sampled"]
    return str(answer["id"])


def test_a_worker_killed_mid_audit_loses_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    # 512 regions and the whole exact budget: an audit of many seconds, however fast scoring gets
    slow = [
        {
            "name": "reference",
            "path": str(MODEL_DIR),
            "budget_fraction": 1.0,
            "n_regions": 512,
            "allow_uncalibrated": True,
        }
    ]
    env = {
        **os.environ,
        "GUARDRAIL_DATABASE_URL": url,
        "GUARDRAIL_LEASE_SECONDS": "2",
        "GUARDRAIL_MODELS": json.dumps(slow),
    }
    settings = load_settings(environ={}, database_url=url, lease_seconds=2)
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    sample_id = _ingest(runtime, EXAMPLE.read_bytes(), "fork knife car clock .", "crash-1")
    victim = subprocess.Popen(  # the supervisor and its audit process in their own group
        [sys.executable, "-m", "guardrail", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with runtime.sessions() as session:
                job = session.query(Job).one()
                if job.status is JobStatus.RUNNING:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("the worker never claimed the job")
        time.sleep(0.5)
        os.killpg(victim.pid, signal.SIGKILL)  # kill -9 of the worker and its audit process
        victim.wait(timeout=10)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    with runtime.sessions() as session:
        assert session.get(Sample, sample_id).status.value == "auditing"  # type: ignore[union-attr]
    survivor = Worker(runtime.sessions, runtime.auditors, runtime.metrics, lease_seconds=30)
    deadline = time.time() + 10
    while not survivor.run_once():  # the job comes back once the dead worker's lease expires
        assert time.time() < deadline, "the job did not come back"
        time.sleep(0.2)
    assert not survivor.run_once()
    with runtime.sessions() as session:
        job = session.query(Job).one()
        assert job.status is JobStatus.DONE and job.attempts == 2
        assert session.get(Sample, sample_id).status.value == "audited"  # type: ignore[union-attr]
        assert session.query(FlaggedToken).count() == 4  # once, not twice


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with schema_url() as url:
        yield url


def test_racing_workers_on_postgresql_audit_each_sample_once(postgres_url: str) -> None:
    runtime = build_runtime(load_settings(environ={}, database_url=postgres_url))
    upgrade(runtime.engine)
    ids = []
    for i in range(6):
        scene = generate_scene(11_000_200 + i, SceneKind.CLEAN)
        ids.append(_ingest(runtime, encode_png(scene.image), scene.caption, f"race-{i}"))
    workers = [
        Worker(runtime.sessions, runtime.auditors, runtime.metrics, owner=f"w{i}") for i in range(3)
    ]
    done: list[str] = []

    def drain(worker: Worker) -> None:
        while worker.run_once():
            done.append(worker.owner)

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(done) == 6
    with runtime.sessions() as session:
        jobs = session.query(Job).all()
        assert all(j.status is JobStatus.DONE and j.attempts == 1 for j in jobs)
        for sample_id in ids:
            sample = session.get(Sample, sample_id)
            assert sample is not None and sample.status.value == "audited"
            positions = [t.position for t in sample.tokens]
            assert positions and len(positions) == len(set(positions))
    runtime.engine.dispose()


def test_a_worker_process_serves_its_own_metrics(tmp_path: Path) -> None:
    import socket
    import urllib.request

    url = f"sqlite:///{tmp_path / 'g.db'}"
    runtime = build_runtime(load_settings(environ={}, database_url=url))
    upgrade(runtime.engine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GUARDRAIL_DATABASE_URL": url}
    process = subprocess.Popen(
        [sys.executable, "-m", "guardrail", "worker", "--metrics-port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        body = ""
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    body = r.read().decode()
                    break
            except OSError:
                time.sleep(0.2)
        # its audit processes' metrics, merged; the global backlog is exported by serve only
        assert "guardrail_audit_duration_seconds" in body
        assert "guardrail_worker_restarts_total" in body
        assert "guardrail_queue_depth" not in body
    finally:
        process.terminate()
        process.wait(timeout=10)
