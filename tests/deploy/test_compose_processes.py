"""The compose topology without containers: each service's command from deploy/compose.yaml runs
as a local process with the service's environment over the image's (Dockerfile ENV), on
PostgreSQL, ports moved to free ones and service hosts to loopback. The migration runs first,
the health checks the compose file gives answer, a chat request through the proxy is audited by
one of the two workers, every process logs JSON lines, and all stop cleanly on SIGTERM."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from dockerfile_parse import DockerfileParser

from detectors.reference import SceneKind, generate_scene
from guardrail.demo.background_server import free_port
from guardrail.service.chat import image_messages
from guardrail.service.images import encode_png
from tests.deploy.test_compose import _compose
from tests.deploy.tools import ROOT
from tests.postgres import schema_url

pytestmark = pytest.mark.slow


def _image_env() -> dict[str, str]:
    parser = DockerfileParser(fileobj=io.BytesIO((ROOT / "Dockerfile").read_bytes()))
    return {k: v for k, v in parser.envs.items() if k != "PATH"}


def _with_option(command: list[str], option: str, value: int) -> list[str]:
    out = list(command)
    out[out.index(option) + 1] = str(value)
    return out


def _guardrail(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "guardrail", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def _healthy(test: list[str], env: dict[str, str], process: subprocess.Popen[bytes]) -> None:
    """Run a compose healthcheck (["CMD", "guardrail", ...]) until it passes."""
    assert test[:2] == ["CMD", "guardrail"], test
    deadline = time.time() + 240
    while True:
        probe = subprocess.run(
            [sys.executable, "-m", "guardrail", *test[2:]], env=env, capture_output=True
        )
        if probe.returncode == 0:
            return
        assert process.poll() is None, f"{test} : the process exited with {process.returncode}"
        assert time.time() < deadline, f"{test} never passed: {probe.stderr!r}"
        time.sleep(1)


def test_the_compose_services_run_and_audit_together(tmp_path: Path) -> None:
    services: dict[str, Any] = _compose()["services"]
    image = {**os.environ, **_image_env()}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    with schema_url("gr_compose") as database:

        def env_of(name: str, **extra: str) -> dict[str, str]:
            service = {k: str(v) for k, v in services[name].get("environment", {}).items()}
            return {**image, **service, "GUARDRAIL_DATABASE_URL": database, **extra}

        try:
            migrate = subprocess.run(
                [sys.executable, "-m", "guardrail", *services["migrate"]["command"]],
                env=env_of("migrate"),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert migrate.returncode == 0, migrate.stderr

            upstream_port = free_port()
            command = _with_option(services["reference"]["command"], "--port", upstream_port)
            logs["reference"] = tmp_path / "reference.log"
            processes["reference"] = _guardrail(command, env_of("reference"), logs["reference"])
            test = _with_option(
                services["reference"]["healthcheck"]["test"], "--port", upstream_port
            )
            _healthy(test, env_of("reference"), processes["reference"])

            port = free_port()
            sidecar_env = env_of(
                "guardrail",
                GUARDRAIL_PORT=str(port),
                GUARDRAIL_UPSTREAM_URL=f"http://127.0.0.1:{upstream_port}",
            )
            logs["guardrail"] = tmp_path / "guardrail.log"
            processes["guardrail"] = _guardrail(
                services["guardrail"]["command"], sidecar_env, logs["guardrail"]
            )
            _healthy(
                services["guardrail"]["healthcheck"]["test"], sidecar_env, processes["guardrail"]
            )

            for replica in range(services["worker"]["deploy"]["replicas"]):
                metrics = free_port()
                name = f"worker-{replica}"
                command = _with_option(services["worker"]["command"], "--metrics-port", metrics)
                logs[name] = tmp_path / f"{name}.log"
                processes[name] = _guardrail(command, env_of("worker"), logs[name])
                test = _with_option(services["worker"]["healthcheck"]["test"], "--port", metrics)
                _healthy(test, env_of("worker"), processes[name])

            scene = generate_scene(11_000_300, SceneKind.COOCCURRENCE_TRAP)
            base = f"http://127.0.0.1:{port}"
            answer = httpx.post(
                f"{base}/v1/chat/completions",
                json={
                    "model": "reference",
                    "messages": image_messages(encode_png(scene.image), "Describe the image."),
                },
                headers={"X-Request-Id": "compose-1", "X-Guardrail-Audit": "always"},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"]
            deadline = time.time() + 300
            audits: list[dict[str, Any]] = []
            while not audits:
                assert time.time() < deadline, "the chat request was never audited"
                time.sleep(1)
                audits = httpx.get(f"{base}/v1/audits", timeout=10).json()["audits"]
            sample_id = audits[0]["sample_id"]
            time.sleep(1)  # the worker's last line
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            codes = {name: p.wait(timeout=90) for name, p in processes.items()}
    assert all(code == 0 for code in codes.values()), codes
    worker_lines = []
    for name, log in logs.items():
        for line in log.read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)  # every line of every service is JSON
            assert {"timestamp", "level", "logger", "message"} <= set(entry), (name, line)
            if name.startswith("worker") and entry.get("sample_id") == sample_id:
                worker_lines.append(entry)
    assert any("audited" in str(e["message"]) for e in worker_lines), "no worker logged the audit"
