"""The numbers `guardrail reference eval` prints: captions, traps, yes/no, and verdicts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from detectors.scorers.llava import load_llava
from guardrail.reference.evaluation import caption_metrics, caption_scenes, eval_scenes
from guardrail.reference.training import weights_checksum

__all__ = ["evaluate"]


def evaluate(
    model_dir: Path, *, seed: int, per_kind: int, verdicts: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Evaluate the model in `model_dir` on `per_kind` scenes of each kind picked by `seed`."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    llava = load_llava(model_dir)
    scenes = eval_scenes(seed, per_kind)
    with tqdm(total=len(scenes), desc="captioning", disable=not progress) as bar:
        results = caption_scenes(llava, scenes, progress=bar)
    report: dict[str, Any] = {
        "seed": seed,
        "n_scenes": len(scenes),
        "parameters": int(sum(p.numel() for p in llava.model.parameters())),
        "sha256": weights_checksum(Path(model_dir)),
    }
    report.update(caption_metrics(results))
    if verdicts:
        from guardrail.reference.diagnosis import diagnose, diagnosis_metrics

        audited = diagnose(llava, results, progress=progress)
        report.update(diagnosis_metrics(audited))
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report
