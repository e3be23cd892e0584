"""The worker decides by the failure's type whether a job is worth another attempt
(`guardrail.errors`), and the CLI turns the error tree's roots into one line and exit 2."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from detectors.errors import InvalidImageError, RemoteUnavailableError
from detectors.reference import CAPTION_PROMPT, MODEL_DIR
from guardrail.cli import main
from guardrail.config import ConfigError, load_settings
from guardrail.errors import (
    GuardrailError,
    MissingImageError,
    PermanentError,
    RetryableError,
    UnknownModelError,
    is_permanent,
)
from guardrail.service.chat import ChatFormatError
from guardrail.service.images import CorruptImageError, DecodeBusyError
from guardrail.service.ingest import IngestBusyError, IngestError
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.worker import Worker
from storage import queue
from storage.engine import upgrade
from storage.models import Job, JobStatus, Sample, SampleStatus
from storage.repositories import add_sample

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"


def _runtime(tmp_path: Path, models: list[dict[str, object]] | None = None) -> Runtime:
    overrides: dict[str, object] = {"models": models} if models is not None else {}
    settings = load_settings(environ={}, database_url=f"sqlite:///{tmp_path / 'g.db'}", **overrides)
    runtime = build_runtime(settings)
    upgrade(runtime.engine)
    return runtime


def _queue(runtime: Runtime, image_data: bytes | None, model: str = "reference") -> str:
    """A job as ingest would store it, but with whatever image bytes the test wants."""
    with runtime.sessions.begin() as session:
        sample = add_sample(
            session,
            model=model,
            image_sha256="0" * 64,
            image_size=(96, 96),
            generated_text="fork knife .",
            token_ids=None,
        )
        queue.enqueue(session, sample.id, image_data=image_data, prompt=CAPTION_PROMPT)
        return sample.id


def _job(runtime: Runtime, sample_id: str) -> tuple[Job, SampleStatus]:
    with runtime.sessions() as session:
        job = session.query(Job).filter(Job.sample_id == sample_id).one()
        sample = session.get(Sample, sample_id)
        assert sample is not None
        return job, sample.status


def test_the_tree_classifies_by_type() -> None:
    for permanent in (
        ConfigError("x"),
        CorruptImageError("x"),
        ChatFormatError("x"),
        IngestError(422, "x"),
        UnknownModelError("x"),
        MissingImageError("x"),
        InvalidImageError("x"),  # detectors' input errors
    ):
        assert is_permanent(permanent), permanent
    for retryable in (
        DecodeBusyError("x", retry_after=1),  # an ImageRejectedError, but busy: retry later
        IngestBusyError(503, "x", retry_after=1),
        RemoteUnavailableError("x"),
        OSError("x"),
        ValueError("the image is fine but this is a bug"),  # no longer guessed from the text
    ):
        assert not is_permanent(retryable), retryable
    assert issubclass(PermanentError, ValueError) and issubclass(PermanentError, GuardrailError)
    assert issubclass(RetryableError, GuardrailError)
    assert issubclass(UnknownModelError, LookupError)


@pytest.mark.parametrize(
    ("image_data", "model", "kind", "words"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "reference", "CorruptImageError", "corrupt"),
        (b"GIF89a" + b"\0" * 20, "reference", "UnsupportedImageFormatError", "GIF"),
        (None, "reference", "MissingImageError", "no image"),
        (b"", "gone", "UnknownModelError", "not configured"),
    ],
)
def test_bad_input_fails_the_job_on_its_first_attempt(
    tmp_path: Path, image_data: bytes | None, model: str, kind: str, words: str
) -> None:
    runtime = _runtime(tmp_path)
    sample_id = _queue(runtime, image_data, model=model)
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    assert worker.run_once()
    assert not worker.run_once()  # not retried
    job, status = _job(runtime, sample_id)
    assert (job.status, job.attempts, job.failure_reason) == (
        JobStatus.FAILED,
        1,
        queue.FailureReason.INVALID_INPUT,
    )
    assert job.last_error is not None and job.last_error.startswith(f"{kind}: ")
    assert words in job.last_error and status is SampleStatus.FAILED
    reason = queue.FailureReason.INVALID_INPUT
    failed = runtime.metrics.jobs_failed.labels(model=model, reason=reason)
    assert failed._value.get() == 1.0


def test_an_unavailable_server_is_retried_not_failed(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model = {
        "name": "reference",
        "path": str(MODEL_DIR),
        "scorer": "remote",
        "remote_url": f"http://127.0.0.1:{port}",
        "allow_uncalibrated": True,
    }
    runtime = _runtime(tmp_path, models=[model])
    sample_id = _queue(runtime, EXAMPLE.read_bytes())
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    assert worker.run_once()
    job, status = _job(runtime, sample_id)
    assert job.status is JobStatus.QUEUED and job.attempts == 1  # back in the queue, later
    assert job.last_error is not None and job.last_error.startswith("RemoteUnavailableError: ")
    assert job.failure_reason is None and status is not SampleStatus.FAILED


def test_the_cli_prints_one_line_for_the_roots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('database_url = "sqlite:///x.db"\nno_such_key = 1\n')
    assert main(["report", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ConfigError: ") and "no_such_key" in err and "\n" not in err
    assert "Traceback" not in err
