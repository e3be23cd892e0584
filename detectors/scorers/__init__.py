"""Scorers: the models behind the `Scorer` protocol.

Model-family adapters (which import torch, transformers and onnxruntime) live in their own
modules and are imported only when used.
"""

from __future__ import annotations

from detectors.scorers.analytic import (
    CASE_NAMES,
    AnalyticCase,
    AnalyticScorer,
    TokenResponse,
    analytic_case,
)
from detectors.scorers.masked import MaskedBatch, fill_image
from detectors.scorers.protocol import Scorer

__all__ = [
    "CASE_NAMES",
    "AnalyticCase",
    "AnalyticScorer",
    "MaskedBatch",
    "Scorer",
    "TokenResponse",
    "analytic_case",
    "fill_image",
]
