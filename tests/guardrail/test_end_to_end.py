"""The whole sidecar as separate processes, as deployed: `guardrail reference serve` upstream,
`guardrail serve` (API + proxy) and two `guardrail worker` processes sharing PostgreSQL,
driven through the proxy with the official `openai` client."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from guardrail.demo.background_server import free_port, spawn_guardrail
from guardrail.service.chat import image_messages
from storage.engine import make_engine, session_factory
from storage.models import Job, JobStatus, Sample
from tests.postgres import schema_url

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def database_url() -> Iterator[str]:
    with schema_url("gr_e2e") as url:
        yield url


def _ask(client: OpenAI, image: Path, request_id: str) -> str:
    answer = client.chat.completions.create(
        model="reference",
        messages=image_messages(image.read_bytes(), "Describe the image."),  # type: ignore[arg-type]
        extra_headers={"X-Request-Id": request_id},
    )
    return str(answer.choices[0].message.content)


def test_proxy_and_two_worker_processes_on_postgresql(database_url: str, tmp_path: Path) -> None:
    from detectors.reference import SceneKind, generate_scene
    from guardrail.service.images import write_image

    images = {
        "knife": ROOT / "examples" / "knife_trap.png",
        "cup": ROOT / "examples" / "cup_trap.png",
    }
    for i in range(3):
        path = tmp_path / f"clean{i}.png"
        write_image(path, generate_scene(11_000_300 + i, SceneKind.CLEAN).image)
        images[f"clean{i}"] = path
    up_port, side_port = free_port(), free_port()
    metric_ports = [free_port(), free_port()]
    env = {
        "GUARDRAIL_DATABASE_URL": database_url,
        "GUARDRAIL_UPSTREAM_URL": f"http://127.0.0.1:{up_port}",
        "GUARDRAIL_WORKERS": "0",
        "GUARDRAIL_TORCH_THREADS": "1",  # two worker processes on two cores
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    subprocess.run(
        [sys.executable, "-m", "guardrail", "db", "upgrade"],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )
    processes = [
        spawn_guardrail(
            ["reference", "serve", "--port", str(up_port)],
            env,
            f"http://127.0.0.1:{up_port}/v1/models",
        ),
        spawn_guardrail(
            ["serve", "--port", str(side_port)], env, f"http://127.0.0.1:{side_port}/readyz"
        ),
    ]
    processes += [
        spawn_guardrail(
            ["worker", "--metrics-port", str(port)], env, f"http://127.0.0.1:{port}/metrics"
        )
        for port in metric_ports
    ]
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{side_port}/v1", api_key="none")
        said = {name: _ask(client, path, f"e2e-{name}") for name, path in images.items()}
        assert said["knife"] == "fork knife car clock ."
        engine = make_engine(database_url)
        sessions = session_factory(engine)
        deadline = time.time() + 120
        while time.time() < deadline:
            with sessions() as session:
                statuses = [s.status.value for s in session.query(Sample).all()]
            if len(statuses) == len(images) and set(statuses) == {"audited"}:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"not all samples were audited: {statuses}")
        with sessions() as session:
            jobs = session.query(Job).all()
            assert len(jobs) == len(images)
            assert all(j.status is JobStatus.DONE and j.attempts == 1 for j in jobs)
            by_request = {s.request_id: s for s in session.query(Sample).all()}
            verdicts = {
                name: {t.word: t.verdict.label for t in by_request[f"e2e-{name}"].tokens}
                for name in images
            }
        engine.dispose()
        assert verdicts["knife"]["fork"] == "borrowed_evidence"
        assert verdicts["cup"]["spoon"] == "language_prior"
        metrics = httpx.get(f"http://127.0.0.1:{side_port}/metrics").text
        assert f'guardrail_samples_sampled_total{{model="reference"}} {len(images)}.0' in metrics
        deadline, audited = time.time() + 10, 0.0
        while time.time() < deadline:  # a worker's audit process reports to it within ~0.1 s
            audited = 0.0
            for port in metric_ports:  # each worker process serves its own registry
                for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
                    if line.startswith("guardrail_audits_total{"):
                        audited += float(line.rsplit(" ", 1)[1])
            if audited == len(images):
                break
            time.sleep(0.2)
        assert audited == len(images)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=15)
