"""The numbers `guardrail reference eval` prints: captions, traps, yes/no, and verdicts."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from detectors.language_prior import PriorThresholds
from detectors.reference.world import Split, split_seeds
from detectors.scorers.llava import LlavaModel, load_llava
from detectors.scorers.vision import OnnxVision
from guardrail.reference.evaluation import caption_metrics, caption_scenes, eval_scenes
from guardrail.reference.training import weights_checksum

__all__ = ["THRESHOLDS_FILE", "calibrate_thresholds", "evaluate", "load_thresholds"]

THRESHOLDS_FILE = "thresholds.json"


@contextmanager
def onnx_vision(llava: LlavaModel) -> Iterator[OnnxVision]:
    """The model's vision encoder exported to a temporary ONNX file and opened (CPU)."""
    from detectors.scorers.llava_fast import llava_onnx_vision
    from detectors.scorers.onnx_export import export_vision

    with tempfile.TemporaryDirectory() as tmp:
        path = export_vision(llava, Path(tmp) / "vision.onnx").path
        yield llava_onnx_vision(llava, path)


def load_thresholds(model_dir: Path) -> PriorThresholds:
    """The thresholds calibrated for this model (defaults if it was never calibrated)."""
    file = Path(model_dir) / THRESHOLDS_FILE
    if not file.is_file():
        return PriorThresholds()
    data = json.loads(file.read_text())
    return PriorThresholds(**data["thresholds"])


def evaluate(
    model_dir: Path,
    *,
    seed: int,
    per_kind: int,
    verdicts: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the model in `model_dir` on `per_kind` scenes of each kind picked by `seed`."""
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

        with onnx_vision(llava) as vision:
            audits = audit_scenes(llava, results, vision=vision, progress=progress)
            report["scorer"] = f"llava-fast({llava.name}; {vision.name})"
        report.update(diagnosis_metrics(mentions_of(audits, load_thresholds(model_dir))))
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def calibrate_thresholds(
    model_dir: Path, *, start: int, per_kind: int, progress: bool = True
) -> dict[str, Any]:
    """Calibrate the verdict thresholds on validation scenes and store them with the model."""
    from guardrail.reference.diagnosis import audit_scenes, calibrate

    seed = split_seeds(Split.VALIDATION, start, per_kind)[0]
    llava = load_llava(model_dir)
    results = caption_scenes(llava, eval_scenes(seed, per_kind))
    with onnx_vision(llava) as vision:
        thresholds = calibrate(audit_scenes(llava, results, vision=vision, progress=progress))
    record = {
        "thresholds": asdict(thresholds),
        "calibrated_on": {"split": "validation", "seed": seed, "scenes_per_kind": per_kind},
        "sha256": weights_checksum(Path(model_dir)),
    }
    (Path(model_dir) / THRESHOLDS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record
