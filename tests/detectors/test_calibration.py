"""Thresholds carry the settings they were calibrated under, and are refused under others."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from detectors import DEFAULT_FILL, EagleSearch, Fill, PriorThresholds, SearchBudget
from detectors.calibration import (
    Calibration,
    CalibrationMismatchError,
    CalibrationSet,
    CalibrationSettings,
)
from detectors.explanation import explain
from detectors.pipeline import AuditSettings
from detectors.reference import MODEL_DIR
from detectors.scorers import analytic_case
from guardrail.reference.report import THRESHOLDS_FILE, load_calibration

MEAN = CalibrationSettings(fill=Fill.MEAN)
BLACK = CalibrationSettings(fill=Fill.BLACK)


def _calibration(settings: CalibrationSettings, ratio: float, sha: str = "ab" * 32) -> Calibration:
    return Calibration(
        thresholds=PriorThresholds(min_prior_ratio=ratio),
        settings=settings,
        model_sha256=sha,
        fitted_on={"split": "validation", "seed": 7, "scenes_per_kind": 3},
    )


def test_one_default_fill_everywhere() -> None:
    import inspect

    assert AuditSettings().fill is DEFAULT_FILL
    assert inspect.signature(EagleSearch).parameters["fill"].default is DEFAULT_FILL
    assert inspect.signature(explain).parameters["fill"].default is DEFAULT_FILL
    case = analytic_case("grounded", 16)
    assert EagleSearch(case.scorer, SearchBudget.exhaustive()).fill is DEFAULT_FILL


def test_thresholds_are_handed_out_only_for_their_settings(tmp_path: Path) -> None:
    file = tmp_path / THRESHOLDS_FILE
    calibrations = CalibrationSet().with_calibration(_calibration(MEAN, 0.2))
    calibrations.with_calibration(_calibration(BLACK, 0.4)).save(file)
    loaded = CalibrationSet.load(file)
    assert loaded.for_settings(MEAN).thresholds.min_prior_ratio == 0.2
    assert loaded.for_settings(BLACK).thresholds.min_prior_ratio == 0.4
    with pytest.raises(CalibrationMismatchError) as caught:
        loaded.for_settings(CalibrationSettings(fill=Fill.MEAN, n_regions=32))
    message = str(caught.value)
    assert "n_regions 32 (calibrated: 48)" in message
    assert "guardrail reference calibrate --fill mean --regions 32 --budget 0.1" in message
    with pytest.raises(CalibrationMismatchError, match="fill blur"):
        loaded.for_settings(CalibrationSettings(fill=Fill.BLUR))
    with pytest.raises(CalibrationMismatchError, match="other weights"):
        loaded.for_settings(MEAN, model_sha256="cd" * 32)
    # recalibrating under the same settings replaces, never duplicates
    again = loaded.with_calibration(_calibration(BLACK, 0.5))
    assert (
        len(again.calibrations) == 2 and again.for_settings(BLACK).thresholds.min_prior_ratio == 0.5
    )


def test_an_uncalibrated_model_gets_the_defaults_marked_as_such(tmp_path: Path) -> None:
    calibration = CalibrationSet.load(tmp_path / "missing.json").for_settings(BLACK)
    assert calibration.thresholds == PriorThresholds() and not calibration.calibrated
    assert calibration.provenance()["calibration"] is None


def test_the_first_format_reads_as_fitted_with_the_defaults_of_its_time(tmp_path: Path) -> None:
    file = tmp_path / THRESHOLDS_FILE
    file.write_text(
        json.dumps(
            {
                "thresholds": {"min_prior_ratio": 0.15, "min_borrowed": 0.15},
                "calibrated_on": {"split": "validation", "seed": 1, "scenes_per_kind": 40},
                "sha256": "ef" * 32,
            }
        )
    )
    calibration = CalibrationSet.load(file).for_settings(
        CalibrationSettings.of(AuditSettings(fill=Fill.MEAN))
    )
    assert calibration.thresholds.min_borrowed == 0.15 and calibration.model_sha256 == "ef" * 32
    with pytest.raises(CalibrationMismatchError):
        CalibrationSet.load(file).for_settings(BLACK)


def test_the_shipped_model_is_calibrated_for_the_defaults_on_its_weights() -> None:
    calibration = load_calibration(Path(MODEL_DIR), AuditSettings(), verify_weights=True)
    assert calibration.calibrated and calibration.settings.fill is DEFAULT_FILL
    provenance = calibration.provenance()
    assert provenance["fitted_on"]["split"] == "validation"
    # the paper's black fill has its own thresholds (`guardrail reference calibrate --fill black`)
    black = load_calibration(Path(MODEL_DIR), AuditSettings(fill=Fill.BLACK), verify_weights=True)
    assert black.calibrated and black.settings.fill is Fill.BLACK
    assert black.thresholds != calibration.thresholds
    with pytest.raises(CalibrationMismatchError, match="fill grey"):
        load_calibration(Path(MODEL_DIR), AuditSettings(fill=Fill.GREY))


def test_guardrail_explain_refuses_an_uncalibrated_fill_before_loading(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model)
    image = Path(__file__).resolve().parents[2] / "examples" / "knife_trap.png"
    command = [sys.executable, "-m", "guardrail", "explain", str(image), "--model", str(model)]
    command += ["--output", "fork knife .", "--out", str(tmp_path / "out"), "--fill", "grey"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode != 0
    assert "not calibrated" in refused.stderr and "--fill grey" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "out").exists()


def test_a_sidecar_model_with_uncalibrated_settings_is_refused_at_configuration() -> None:
    from guardrail.config import ConfigError, load_settings

    model = {"name": "reference", "path": str(MODEL_DIR)}
    assert load_settings(environ={}, models=[model]).models[0].audit_settings().fill is DEFAULT_FILL
    for change, named in (({"fill": "grey"}, "fill grey"), ({"n_regions": 32}, "n_regions 32")):
        with pytest.raises(ConfigError, match=named) as caught:
            load_settings(environ={}, models=[{**model, **change}])
        assert "guardrail reference calibrate" in str(caught.value)


def test_allow_uncalibrated_takes_the_nearest_calibration_of_the_same_fill(
    tmp_path: Path,
) -> None:
    from guardrail.config import load_settings

    file = tmp_path / THRESHOLDS_FILE
    CalibrationSet().with_calibration(_calibration(MEAN, 0.2)).with_calibration(
        _calibration(BLACK, 0.4)
    ).save(file)
    wanted = CalibrationSettings(fill=Fill.BLACK, n_regions=16)
    assert CalibrationSet.load(file).for_settings(wanted, strict=False).settings == BLACK
    model = {"name": "reference", "path": str(MODEL_DIR), "n_regions": 16}
    settings = load_settings(environ={}, models=[{**model, "allow_uncalibrated": True}])
    assert settings.models[0].audit_settings().n_regions == 16
