"""Audits run in supervised child processes: a worker that dies by SIGSEGV mid-audit never
interrupts the proxy, is restarted, and a sample that keeps killing its workers fails as
`worker_crashed`; SIGINT on a busy worker stops it cleanly and gives its job back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from detectors.reference import CAPTION_PROMPT, MODEL_DIR
from guardrail.demo.background_server import free_port, spawn_guardrail
from guardrail.service.chat import image_messages
from storage.engine import make_engine, session_factory, upgrade
from storage.models import Job, JobStatus, WorkerRecord

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"
# the whole exact budget over 48 regions: an audit of several seconds, long enough to be hit
SLOW = {
    "name": "reference",
    "path": str(MODEL_DIR),
    "budget_fraction": 1.0,
    "sample_rate": 0.0,
    "allow_uncalibrated": True,
}

pytestmark = pytest.mark.slow


def _auditing_pid(
    sessions: object, job_id: int, timeout: float = 90.0, dead: tuple[int, ...] = ()
) -> int:
    """The pid of the worker process that holds `job_id`, once it does (`dead`: pids killed
    before, whose heartbeat rows linger until they go stale)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with sessions() as session:  # type: ignore[operator]
            rows = session.query(WorkerRecord).filter(WorkerRecord.job_id == job_id).all()
            for row in rows:
                if row.pid not in dead:
                    return int(row.pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker claimed job {job_id} within {timeout} s")


def test_a_segfaulting_worker_never_interrupts_the_proxy_and_its_poison_job_fails(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    engine = make_engine(url)
    upgrade(engine)
    sessions = session_factory(engine)
    up_port, port = free_port(), free_port()
    env = {
        "GUARDRAIL_DATABASE_URL": url,
        "GUARDRAIL_UPSTREAM_URL": f"http://127.0.0.1:{up_port}",
        "GUARDRAIL_WORKERS": "1",
        "GUARDRAIL_SCHEDULER": "false",
        "GUARDRAIL_LEASE_SECONDS": "3",
        "GUARDRAIL_MAX_ATTEMPTS": "2",
        "GUARDRAIL_TORCH_THREADS": "1",
        "GUARDRAIL_MODELS": json.dumps([SLOW]),
    }
    upstream = spawn_guardrail(
        ["reference", "serve", "--port", str(up_port)], env, f"http://127.0.0.1:{up_port}/v1/models"
    )
    serve = spawn_guardrail(
        ["serve", "--port", str(port)], env, f"http://127.0.0.1:{port}/readyz", timeout=90
    )
    base = f"http://127.0.0.1:{port}"
    outcomes: list[int] = []
    stop = threading.Event()

    def traffic() -> None:  # production traffic through the proxy, all along
        body = {"model": "reference", "messages": image_messages(EXAMPLE.read_bytes(), "Hi.")}
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{base}/v1/chat/completions", json=body)
                    outcomes.append(r.status_code)
                except httpx.HTTPError:
                    outcomes.append(0)
                time.sleep(0.05)

    sender = threading.Thread(target=traffic, daemon=True)
    try:
        sender.start()
        import base64

        answer = httpx.post(
            f"{base}/v1/samples",
            json={
                "model": "reference",
                "prompt": CAPTION_PROMPT,
                "output": "fork knife car clock .",
                "image_base64": base64.b64encode(EXAMPLE.read_bytes()).decode(),
                "audit": True,
            },
            timeout=30,
        )
        assert answer.status_code == 202, answer.text
        sample_id = answer.json()["id"]
        with sessions() as session:
            job_id = session.query(Job).filter(Job.sample_id == sample_id).one().id
        victims = []
        for _ in range(2):  # max_attempts: every worker that takes the job dies mid-audit
            pid = _auditing_pid(sessions, job_id, dead=tuple(victims))
            victims.append(pid)
            time.sleep(0.3)
            os.kill(pid, signal.SIGSEGV)
        deadline = time.time() + 90
        view: dict[str, object] = {}
        while time.time() < deadline:  # a restarted worker fails it once the lease runs out
            view = httpx.get(f"{base}/v1/samples/{sample_id}", timeout=10).json()
            if view["status"] == "failed":
                break
            time.sleep(0.2)
        assert view["status"] == "failed", view
        job = view["job"]
        assert isinstance(job, dict)
        assert job["failure_reason"] == "worker_crashed" and job["attempts"] == 2
        assert "worker_crashed" in str(job["error"])
        deadline = time.time() + 30
        text = ""
        while time.time() < deadline:  # the child's counters reach the parent's /metrics
            text = httpx.get(f"{base}/metrics", timeout=10).text
            if 'guardrail_jobs_failed_total{model="reference",reason="worker_crashed"} 1.0' in text:
                break
            time.sleep(0.5)
        assert 'guardrail_jobs_failed_total{model="reference",reason="worker_crashed"} 1.0' in text
        assert 'guardrail_worker_restarts_total{kind="worker"} 2.0' in text
        stop.set()
        sender.join(timeout=30)
        assert len(outcomes) >= 20 and set(outcomes) == {200}, outcomes  # not one failed
        with sessions() as session:  # the queue moves on: nothing else is stuck behind it
            assert session.query(Job).filter(Job.status == JobStatus.RUNNING).count() == 0
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0  # a clean stop
    finally:
        stop.set()
        for process in (serve, upstream):
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        engine.dispose()


def test_sigint_on_a_busy_worker_stops_it_cleanly_and_gives_the_job_back(tmp_path: Path) -> None:
    from guardrail.config import load_settings
    from guardrail.service.ingest import IngestRequest, ingest
    from guardrail.service.runtime import build_runtime

    url = f"sqlite:///{tmp_path / 'g.db'}"
    runtime = build_runtime(load_settings(environ={}, database_url=url))
    upgrade(runtime.engine)
    answer = ingest(
        runtime,
        IngestRequest(
            model="reference",
            prompt=CAPTION_PROMPT,
            image_bytes=EXAMPLE.read_bytes(),
            # eight words searched over 256 regions: an audit of several seconds even on a
            # quiet machine (4 words over 64 regions took 1.2 s, inside the grace period)
            output="fork knife car clock . fork knife car clock .",
            force=True,
        ),
    )
    env = {
        **os.environ,
        "GUARDRAIL_DATABASE_URL": url,
        "GUARDRAIL_STOP_GRACE_SECONDS": "1",
        "GUARDRAIL_TORCH_THREADS": "1",
        "GUARDRAIL_MODELS": json.dumps([{**SLOW, "budget_fraction": 1.0, "n_regions": 256}]),
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as stderr:
        worker = subprocess.Popen(  # in its own session, as a terminal's foreground job is
            [sys.executable, "-m", "guardrail", "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        pid = _auditing_pid(runtime.sessions, 1)
        time.sleep(0.5)
        os.killpg(worker.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        code = worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert code == 130, output
    assert "terminate called" not in output and "Traceback" not in output, output
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the audit process is gone too
    with runtime.sessions() as session:
        job = session.query(Job).one()
        # released within the grace period: back in the queue, the attempt not counted
        assert job.status is JobStatus.QUEUED and job.attempts == 0 and job.lease_owner is None
        assert job.image_data is not None  # what the audit needs is still there
        assert session.query(WorkerRecord).count() == 0
    assert answer["sampled"]
    runtime.engine.dispose()
