from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from guardrail import __version__
from guardrail.cli import main


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert f"guardrail {__version__}" in out and "explain-case" in out


def test_explain_case_prints_verdicts_and_writes_a_heatmap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "h.png"
    assert (
        main(["explain-case", "borrowed_evidence", "--regions", "16", "--heatmap", str(png)]) == 0
    )
    out = capsys.readouterr().out
    assert "borrowed_evidence" in out and "knife" in out and "fork" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_expected_failures_print_a_message_not_a_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "guardrail", "explain-case", "nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("ValueError: unknown analytic case")
    assert "Traceback" not in proc.stderr
