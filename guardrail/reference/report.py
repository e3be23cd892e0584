"""The numbers `guardrail reference eval` prints: captions, traps, yes/no, and verdicts."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from detectors.calibration import (
    THRESHOLDS_FILE,
    Calibration,
    CalibrationSet,
    CalibrationSettings,
)
from detectors.calibration import load_calibration as calibration_of
from detectors.language_prior import PriorThresholds
from detectors.pipeline import AuditSettings
from detectors.reference.world import Split, split_seeds
from detectors.scorers.families.llava import LlavaModel, load_llava
from detectors.scorers.vision import OnnxVision
from guardrail.reference.evaluation import caption_metrics, caption_scenes, eval_scenes
from guardrail.reference.training import weights_checksum

__all__ = [
    "THRESHOLDS_FILE",
    "calibrate_thresholds",
    "evaluate",
    "load_calibration",
    "load_thresholds",
]


@contextmanager
def onnx_vision(llava: LlavaModel) -> Iterator[OnnxVision]:
    """The model's vision encoder exported to a temporary ONNX file and opened (CPU)."""
    from detectors.scorers.families.llava import llava_onnx_vision
    from detectors.scorers.onnx_export import export_vision

    with tempfile.TemporaryDirectory() as tmp:
        path = export_vision(llava, Path(tmp) / "vision.onnx").path
        yield llava_onnx_vision(llava, path)


def load_calibration(
    model_dir: Path,
    settings: AuditSettings | None = None,
    *,
    verify_weights: bool = False,
    strict: bool = True,
) -> Calibration:
    """`detectors.calibration.load_calibration`; `verify_weights` also checks the weights'
    SHA-256 against the one the thresholds were fitted on (reads all of `model.safetensors`)."""
    sha = weights_checksum(Path(model_dir)) if verify_weights else None
    return calibration_of(Path(model_dir), settings, model_sha256=sha, strict=strict)


def load_thresholds(model_dir: Path, settings: AuditSettings | None = None) -> PriorThresholds:
    """The thresholds of `load_calibration`."""
    return load_calibration(model_dir, settings).thresholds


def evaluate(
    model_dir: Path,
    *,
    seed: int,
    per_kind: int,
    verdicts: bool = True,
    progress: bool = True,
    settings: AuditSettings | None = None,
) -> dict[str, Any]:
    """Evaluate the model in `model_dir` on `per_kind` scenes of each kind picked by `seed`,
    auditing with `settings` and the thresholds calibrated for them."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    llava = load_llava(model_dir)
    scenes = eval_scenes(seed, per_kind)
    with tqdm(total=len(scenes), desc="captioning", disable=None if progress else True) as bar:
        results = caption_scenes(llava, scenes, progress=bar)
    report: dict[str, Any] = {
        "seed": seed,
        "n_scenes": len(scenes),
        "parameters": int(sum(p.numel() for p in llava.model.parameters())),
        "sha256": weights_checksum(Path(model_dir)),
    }
    report.update(caption_metrics(results))
    if verdicts:
        from guardrail.reference.diagnosis import audit_scenes, diagnosis_metrics, mentions_of

        calibration = load_calibration(model_dir, settings, verify_weights=True)
        with onnx_vision(llava) as vision:
            audits = audit_scenes(
                llava, results, settings=settings, vision=vision, progress=progress
            )
            report["scorer"] = f"llava-fast({llava.name}; {vision.name})"
        report["calibration"] = calibration.provenance()
        report.update(diagnosis_metrics(mentions_of(audits, calibration.thresholds)))
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def calibrate_thresholds(
    model_dir: Path,
    *,
    start: int,
    per_kind: int,
    progress: bool = True,
    settings: AuditSettings | None = None,
) -> dict[str, Any]:
    """Calibrate the verdict thresholds on validation scenes, auditing with `settings`, and
    store them with the model beside the calibrations for other settings."""
    from guardrail.reference.diagnosis import audit_scenes, calibrate

    settings = settings or AuditSettings()
    seed = split_seeds(Split.VALIDATION, start, per_kind)[0]
    llava = load_llava(model_dir)
    results = caption_scenes(llava, eval_scenes(seed, per_kind))
    with onnx_vision(llava) as vision:
        audits = audit_scenes(llava, results, settings=settings, vision=vision, progress=progress)
    calibration = Calibration(
        thresholds=calibrate(audits),
        settings=CalibrationSettings.of(settings),
        model_sha256=weights_checksum(Path(model_dir)),
        fitted_on={"split": "validation", "seed": seed, "scenes_per_kind": per_kind},
    )
    file = Path(model_dir) / THRESHOLDS_FILE
    CalibrationSet.load(file).with_calibration(calibration).save(file)
    return calibration.as_dict()
