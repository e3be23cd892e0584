"""Package-level contracts: no heavy imports, a pinned public API."""

from __future__ import annotations

import subprocess
import sys

import detectors


def test_import_detectors_does_not_import_heavy_frameworks() -> None:
    code = (
        "import sys, detectors, detectors.scorers, detectors.evaluation, detectors.heatmap;"
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_is_pinned() -> None:
    assert sorted(detectors.__all__) == sorted(
        [
            "DEFAULT_FILL",
            "Attribution",
            "CrossEvidence",
            "EagleSearch",
            "Explanation",
            "Fill",
            "PriorThresholds",
            "RegionPartition",
            "SearchBudget",
            "StopReason",
            "Target",
            "Verdict",
            "VerdictLabel",
            "__version__",
            "errors",
            "evaluation",
            "exact_search_passes",
            "explain",
            "grid_partition",
            "heatmap",
            "judge",
            "judge_sample",
            "language_prior",
            "scorers",
            "slic_partition",
        ]
    )
    for name in detectors.__all__:
        assert hasattr(detectors, name), name


def test_scorers_api_is_pinned() -> None:
    from detectors import scorers

    assert sorted(scorers.__all__) == sorted(
        [
            "CASE_NAMES",
            "AnalyticCase",
            "AnalyticScorer",
            "MaskedBatch",
            "Scorer",
            "TokenResponse",
            "analytic_case",
            "fill_image",
        ]
    )


def test_only_the_gpu_build_of_onnxruntime_is_installed() -> None:
    # both distributions own the `onnxruntime` import package; the last one installed wins
    from importlib import metadata

    import pytest

    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution("onnxruntime")
    assert metadata.distribution("onnxruntime-gpu").version
