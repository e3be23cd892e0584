"""README claims checked as a user would meet them: settings precedence as `guardrail config
check` prints it, `scheduler = false` in a running `guardrail serve`, weekly reports, heatmaps
over a neutral canvas when raw images are not stored, and the eval command's table."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from detectors.reference import CAPTION_PROMPT
from guardrail.commands.report import make_report
from guardrail.config import load_settings
from guardrail.demo.background_server import free_port, spawn_guardrail
from guardrail.service.ingest import IngestRequest, ingest
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.scheduler import Scheduler
from guardrail.service.worker import Worker
from storage.engine import make_engine, upgrade
from storage.models import Report
from tests.guardrail.test_scheduler import _audited, _runtime

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _config_check(config: Path, env: dict[str, str]) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GUARDRAIL_")}
    result = subprocess.run(
        [sys.executable, "-m", "guardrail", "config", "check", "--config", str(config)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_environment_beats_the_toml_file_which_beats_the_defaults(tmp_path: Path) -> None:
    config = tmp_path / "guardrail.toml"
    config.write_text(
        "workers = 3\nscheduler = false\nlease_seconds = 45\n"
        '[otel_resource_attributes]\n"deployment.environment" = "staging"\nteam = "vision"\n'
    )
    shown = _config_check(
        config,
        {
            "GUARDRAIL_WORKERS": "0",  # over the file's 3
            # `__` reaches into a table: one key replaced, the file's other key kept
            "GUARDRAIL_OTEL_RESOURCE_ATTRIBUTES__team": "multimodal",
            "GUARDRAIL_OTEL_RESOURCE_ATTRIBUTES__region": "eu-west-1",
            "GUARDRAIL_API_TOKENS": '["token-number-one-1234"]',  # lists as JSON
        },
    )
    assert shown["workers"] == 0
    assert shown["scheduler"] is False and shown["lease_seconds"] == 45.0  # from the file
    assert shown["max_attempts"] == 5  # the default
    assert shown["otel_resource_attributes"] == {
        "deployment.environment": "staging",
        "team": "multimodal",
        "region": "eu-west-1",
    }
    assert shown["api_tokens"] == ["****1234"]  # masked: the last 4 characters only


def _children(config: Path, env: dict[str, str]) -> dict[str, int]:
    port = free_port()
    process = spawn_guardrail(
        ["serve", "--config", str(config), "--port", str(port)],
        env,
        f"http://127.0.0.1:{port}/readyz",
        timeout=120,
    )
    try:
        body = httpx.get(f"http://127.0.0.1:{port}/readyz/audit", timeout=30).json()
        return body["children"]  # type: ignore[no-any-return]
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_scheduler_false_runs_no_scheduler_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    upgrade(make_engine(url))
    env = {"GUARDRAIL_DATABASE_URL": url, "GUARDRAIL_WORKERS": "0"}
    off, on = tmp_path / "off.toml", tmp_path / "on.toml"
    off.write_text("scheduler = false\n")
    on.write_text("scheduler = true\n")
    assert _children(off, env) == {}
    assert _children(on, env) == {"scheduler": 1}


def test_the_weekly_report_covers_the_seven_days_before_today(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path)
    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    _audited(runtime, now - timedelta(days=3), ["grounded", "language_prior"])
    _audited(runtime, today - timedelta(days=7), ["borrowed_evidence"])  # the first instant
    _audited(runtime, today - timedelta(days=7, seconds=1), ["grounded"] * 5)  # before it
    _audited(runtime, today + timedelta(seconds=1), ["grounded"] * 7)  # today: the next one
    scheduler = Scheduler(runtime)
    (job,) = [j for j in scheduler.scheduler.get_jobs() if j.id == "report_weekly"]
    job.func()  # what the cron trigger runs (SQLite: this process leads)
    with runtime.sessions() as session:
        (report,) = session.query(Report).all()
        kind, since, until, data = report.kind, report.period_start, report.period_end, report.data
    assert kind == "weekly"
    assert since.replace(tzinfo=UTC) == today - timedelta(days=7)
    assert until.replace(tzinfo=UTC) == today
    assert data["samples"] == 2 and data["audited_words"] == 3
    assert data["verdicts"] == {"grounded": 1, "language_prior": 1, "borrowed_evidence": 1}
    assert str(job.trigger) == "cron[month='*', day='*', day_of_week='mon', hour='6', minute='0']"


@pytest.fixture(scope="module")
def not_stored(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    """One real audit of the knife trap with raw images not stored (the default)."""
    tmp = tmp_path_factory.mktemp("neutral")
    runtime = build_runtime(
        load_settings(environ={}, database_url=f"sqlite:///{tmp / 'g.db'}", store_raw=False)
    )
    upgrade(runtime.engine)
    ingest(
        runtime,
        IngestRequest(
            model="reference",
            prompt=CAPTION_PROMPT,
            image_bytes=(EXAMPLES / "knife_trap.png").read_bytes(),
            output="fork knife car clock .",
        ),
    )
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    while worker.run_once():
        pass
    return runtime


def _pixels(png_base64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64))).convert("RGB"))


def test_without_raw_images_heatmaps_are_drawn_over_a_neutral_canvas(not_stored: Runtime) -> None:
    now = datetime.now(UTC)
    report_id, data = make_report(not_stored, now - timedelta(hours=1), now, "on_demand")
    examples = data["worst_examples"]
    assert examples and not any(ex["raw_image"] for ex in examples)
    with not_stored.sessions() as session:
        report = session.get(Report, report_id)
        assert report is not None
        assert "neutral canvas of the same regions" in report.html
    picture = _pixels(examples[0]["heatmap_png"])
    # a neutral canvas: each region is one flat colour (its saliency), its outline another;
    # the picture itself (textured backgrounds, shaded objects) would give thousands
    colours = np.unique(picture.reshape(-1, 3), axis=0)
    assert 2 < len(colours) <= 4 * 48  # 98 measured; over the image: 2,310
    # and nothing of the image survives: the stored sample holds its hash, no pixels
    from storage.models import Sample

    with not_stored.sessions() as session:
        (sample,) = session.query(Sample).all()
        assert sample.image_data is None and len(sample.image_sha256) == 64


def test_the_eval_prints_the_readme_table_as_json() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "guardrail", "reference", "eval", "--scenes", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["n_scenes"] == 4  # one of each kind
    # each row of the README's eval table is a key
    rates = (
        "caption_object_precision",
        "caption_object_recall",
        "yes_no_accuracy",
        "trap_hallucination_rate",
        "cooccurrence_trap_rate",
        "prior_trap_rate",
        "control_false_mention_rate",
        "cooccurrence_false_yes_rate",
        "prior_false_yes_rate",
        "pointing_game_box",
        "pointing_game_mask",
    )
    for key in rates:
        assert 0.0 <= row[key] <= 1.0, key
    assert row["n_mentions"] > row["n_hallucinated"] >= 1
    assert row["n_hallucinated"] == row["n_cooccurrence"] + row["n_language_prior"]
    for key in ("hallucination_auroc", "baseline_p_full_auroc"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row["forward_passes_mean"] > 0
    assert row["calibration"]["calibration"]["fill"] == "mean"
