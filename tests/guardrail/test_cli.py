from __future__ import annotations

import json
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


def test_export_vision_writes_a_verified_onnx_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from detectors.reference import MODEL_DIR

    out = tmp_path / "vision.onnx"
    assert main(["export-vision", str(MODEL_DIR), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["bytes"] == out.stat().st_size
    assert report["max_abs_diff_real"] <= 1e-4 and report["output_shape"][1:] == [36, 128]
    missing = tmp_path / "nowhere"
    assert main(["export-vision", str(missing), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_db_upgrade_and_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    assert main(["db", "current", "--url", url]) == 1
    assert "needs `guardrail db upgrade`" in capsys.readouterr().out
    assert main(["db", "upgrade", "--url", url]) == 0
    assert "schema at revision 0003" in capsys.readouterr().out
    assert main(["db", "current", "--url", url]) == 0
