"""EAGLE attribution for multimodal LLMs: which image regions make a model produce a token,
and whether it relies on them or on its language prior.

`import detectors` does not import torch, transformers or onnxruntime; model scorers import
them when they are used.
"""

from __future__ import annotations

from detectors import errors, evaluation, heatmap, language_prior, scorers
from detectors.budget import SearchBudget, exact_search_passes
from detectors.eagle import EagleSearch
from detectors.explanation import Explanation, explain
from detectors.language_prior import PriorThresholds, judge, judge_sample
from detectors.regions import RegionPartition, grid_partition, slic_partition
from detectors.types import (
    DEFAULT_FILL,
    Attribution,
    CrossEvidence,
    Fill,
    StopReason,
    Target,
    Verdict,
    VerdictLabel,
)
from detectors.version import __version__

__all__ = [
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
