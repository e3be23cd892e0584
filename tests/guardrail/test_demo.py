"""`guardrail demo --quick`, the project's main job, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardrail.cli import main


def test_the_quick_demo_fires_the_spike_alert_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "spike alert fired" in out and "reached the webhook" in out
    assert "verdicts against the ground truth" in out
    assert "co-occurrence halluc." in out and "language-prior halluc." in out
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert "guardrail_tokens_audited_total" in (tmp_path / "metrics.txt").read_text()
