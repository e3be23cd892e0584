"""`log_format = "json"`: every line a `guardrail serve` process and its audit worker write to
stderr is one JSON object, uvicorn's access lines included, with the request and sample ids."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from detectors.reference import CAPTION_PROMPT
from guardrail.config import ConfigError, load_settings
from guardrail.demo.background_server import free_port
from guardrail.logs import JsonFormatter, configure_logging, log_context
from storage.engine import make_engine, upgrade

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"


def _lines(path: Path) -> list[dict[str, object]]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"stderr line {number} is not JSON: {line!r}")
        assert isinstance(entry, dict), line
        for key in ("timestamp", "level", "logger", "message", "process"):
            assert key in entry, f"line {number} has no {key!r}: {line}"
        stamp = datetime.fromisoformat(str(entry["timestamp"]))
        assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0
        assert entry["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
        entries.append(entry)
    return entries


@pytest.mark.slow
def test_serve_and_its_worker_write_json_lines_with_request_and_sample_ids(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    upgrade(make_engine(url))
    port = free_port()
    stderr_path = tmp_path / "stderr.log"
    env = {
        **os.environ,
        "GUARDRAIL_DATABASE_URL": url,
        "GUARDRAIL_LOG_FORMAT": "json",
        "GUARDRAIL_ACCESS_LOG": "true",
        "GUARDRAIL_SCHEDULER": "false",
        "GUARDRAIL_WORKERS": "1",
        "GUARDRAIL_PORT": str(port),
    }
    base = f"http://127.0.0.1:{port}"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "guardrail", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            deadline = time.time() + 60
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.time() < deadline and process.poll() is None, "serve did not start"
                time.sleep(0.2)
            body = {
                "model": "reference",
                "prompt": CAPTION_PROMPT,
                "output": "fork knife car clock .",
                "image_base64": base64.b64encode(EXAMPLE.read_bytes()).decode(),
                "request_id": "req-logs-1",  # stored with the sample: the worker logs it
            }
            headers = {"X-Request-Id": "req-logs-1", "X-Guardrail-Audit": "always"}
            answer = httpx.post(f"{base}/v1/samples", json=body, headers=headers, timeout=30)
            assert answer.status_code == 202, answer.text
            sample_id = answer.json()["id"]
            bad = httpx.post(f"{base}/v1/samples", json={"model": "reference"}, timeout=10)
            assert bad.status_code == 422
            deadline = time.time() + 240  # the worker loads the model first
            status = ""
            while status not in ("audited", "failed"):
                assert time.time() < deadline, f"sample still {status!r}"
                time.sleep(0.5)
                status = httpx.get(f"{base}/v1/samples/{sample_id}", timeout=10).json()["status"]
            assert status == "audited"
            time.sleep(0.5)  # the worker's last line
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
    assert code == 0
    entries = _lines(stderr_path)
    loggers = {str(e["logger"]) for e in entries}
    assert {"uvicorn.error", "uvicorn.access", "guardrail.supervisor"} <= loggers, loggers

    accesses = [e for e in entries if e["logger"] == "uvicorn.access"]
    posted = [e for e in accesses if e.get("http_method") == "POST" and e["http_status"] == 202]
    assert len(posted) == 1, accesses
    assert posted[0]["http_path"] == "/v1/samples"
    assert posted[0]["request_id"] == "req-logs-1"
    assert posted[0]["sample_id"] == sample_id
    refused = [e for e in accesses if e.get("http_status") == 422]
    assert len(refused) == 1 and "request_id" not in refused[0] and "sample_id" not in refused[0]

    # the audit ran in a supervised child: its lines name the sample and the client's request
    # (the worker's own heartbeat thread logs outside any audit, without them)
    audit_lines = [
        e
        for e in entries
        if e["logger"] == "guardrail.worker"
        and re.search(r"job \d+ (audited|\(model)", str(e["message"]))
    ]
    assert len(audit_lines) == 2, [e for e in entries if e["logger"] == "guardrail.worker"]
    assert all(e["sample_id"] == sample_id for e in audit_lines), audit_lines
    assert all(e["request_id"] == "req-logs-1" for e in audit_lines), audit_lines
    assert all(str(e["process"]).startswith("guardrail-worker-") for e in audit_lines)


def test_json_formatter_carries_context_and_exceptions() -> None:
    logger = logging.getLogger("tests.deploy.json")
    record = logger.makeRecord(
        "tests.deploy.json", logging.ERROR, __file__, 1, "a %s", ("b",), None
    )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "a b" and entry["level"] == "ERROR"
    assert "request_id" not in entry and "sample_id" not in entry
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        exc_info = sys.exc_info()
    with log_context(request_id="r1", sample_id="s1"):
        record = logger.makeRecord(
            "tests.deploy.json", logging.ERROR, __file__, 1, "failed", (), exc_info
        )
        entry = json.loads(JsonFormatter().format(record))
    assert entry["request_id"] == "r1" and entry["sample_id"] == "s1"
    assert "RuntimeError: boom" in entry["exception"]
    record = logger.makeRecord("x", logging.INFO, __file__, 1, "after", (), None)
    assert "request_id" not in json.loads(JsonFormatter().format(record))  # the block reset it


def test_log_format_is_validated() -> None:
    assert load_settings(environ={}).log_format == "text"
    assert load_settings(environ={"GUARDRAIL_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigError, match="log_format"):
        load_settings(environ={"GUARDRAIL_LOG_FORMAT": "xml"})
    with pytest.raises(ValueError, match="xml"):
        configure_logging("xml")  # type: ignore[arg-type]


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    """`guardrail explain` with stderr into a file (a log): no tqdm bar, no loading bar."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "guardrail", "explain", str(EXAMPLE), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "fork" in result.stdout  # it did explain
    assert (
        "\r" not in result.stderr and "it/s" not in result.stderr and "pass/s" not in result.stderr
    )
    assert "%|" not in result.stderr, result.stderr


def test_the_reference_commands_draw_bars_only_on_a_terminal() -> None:
    import inspect

    from guardrail.reference import diagnosis, report, training

    for module in (diagnosis, report, training):
        source = inspect.getsource(module)
        calls = source.count("tqdm(")
        assert calls and source.count("disable=None if progress else True") == calls, module
