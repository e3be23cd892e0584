"""Audit reports from a database filled by real audits of the reference model."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from detectors.reference import CAPTION_PROMPT
from guardrail.cli import main
from guardrail.commands.report import make_report
from guardrail.config import load_settings
from guardrail.service.api import create_app
from guardrail.service.ingest import IngestRequest, ingest
from guardrail.service.runtime import Runtime, build_runtime
from guardrail.service.worker import Worker
from storage.engine import upgrade
from storage.models import Report

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SAID = {"knife_trap": "fork knife car clock .", "cup_trap": "car ball cup spoon tree ."}


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    tmp = tmp_path_factory.mktemp("reports")
    runtime = build_runtime(
        load_settings(environ={}, database_url=f"sqlite:///{tmp / 'g.db'}", store_raw=True)
    )
    upgrade(runtime.engine)
    for name, output in SAID.items():
        ingest(
            runtime,
            IngestRequest(
                model="reference",
                prompt=CAPTION_PROMPT,
                image_bytes=(EXAMPLES / f"{name}.png").read_bytes(),
                output=output,
                request_id=name,
            ),
        )
    worker = Worker(runtime.sessions, runtime.auditors, runtime.metrics)
    while worker.run_once():
        pass
    return runtime


def _period() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(hours=1), now + timedelta(minutes=1)


def test_a_report_shows_the_figures_and_the_worst_examples(audited: Runtime) -> None:
    since, until = _period()
    report_id, data = make_report(audited, since, until, "on_demand")
    assert data["samples"] == 2 and data["audited_words"] == 9
    assert data["verdicts"]["language_prior"] >= 1 and data["verdicts"]["borrowed_evidence"] >= 1
    assert ["spoon", 1] in [list(t) for t in data["top_language_prior_objects"]]
    words = {ex["word"] for ex in data["worst_examples"]}
    assert {"fork", "spoon"} <= words
    assert all(ex["heatmap_png"] and ex["raw_image"] for ex in data["worst_examples"])
    again, _ = make_report(audited, since, until, "on_demand")
    assert again == report_id  # one report per kind and period
    client = TestClient(create_app(audited))
    listed = client.get("/v1/reports").json()["reports"]
    ids = [r["id"] for r in listed]  # the module's other tests may have added their own
    assert ids.count(report_id) == 1 and len(set(ids)) == len(ids)
    page = client.get(f"/reports/{report_id}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for figure in ("fig-rate", "fig-verdicts", "fig-objects"):
        assert f'id="{figure}"' in html
    assert html.count("data:image/png;base64,") >= 3 + len(data["worst_examples"])
    assert client.get("/reports/nope").status_code == 404
    as_json = client.get(f"/v1/reports/{report_id}").json()
    assert as_json["audited_words"] == 9 and "heatmap_png" not in as_json["worst_examples"][0]


def test_guardrail_report_writes_html_and_json(
    audited: Runtime,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = audited.settings.database_url.get_secret_value()
    monkeypatch.setenv("GUARDRAIL_DATABASE_URL", url)
    since, until = _period()
    code = main(
        [
            "report",
            "--since",
            since.isoformat(),
            "--until",
            until.isoformat(),
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0 and "audited words" in capsys.readouterr().out
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["audited_words"] == 9 and (tmp_path / "report.html").stat().st_size > 10_000
    with audited.sessions() as session:
        assert session.query(Report).count() >= 1
    assert main(["report", "--since", until.isoformat(), "--until", since.isoformat()]) == 2


def test_the_report_renders_in_headless_chromium(audited: Runtime, tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("GUARDRAIL_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is required (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    since, until = _period()
    report_id, _ = make_report(audited, since, until, "on_demand")
    with audited.sessions() as session:
        report = session.get(Report, report_id)
        assert report is not None
        page = tmp_path / "report.html"
        page.write_text(report.html)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = tmp_path / "report.png"
    run = subprocess.run(
        [
            chromium,
            *flags,
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            "--window-size=1000,1600",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 20_000, run.stderr[-2000:]
    assert "CONSOLE" not in run.stderr, run.stderr[-2000:]  # no console errors
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    for figure in ("fig-rate", "fig-verdicts", "fig-objects"):
        assert f'id="{figure}"' in dom
    assert dom.count('class="heatmap"') >= 2
