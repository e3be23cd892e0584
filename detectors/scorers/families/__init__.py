"""Model families: one module per transformers architecture, registered in `registry`.

Importing this package does not import torch; a family imports it when it loads or scores.
"""

from __future__ import annotations

from detectors.scorers.families.base import Generation, LoadedModel, ModelFamily, VisionFiles
from detectors.scorers.families.registry import (
    FAMILY_NAMES,
    SUPPORTED_ARCHITECTURES,
    UnknownArchitectureError,
    family_for_architecture,
    family_named,
    family_of_checkpoint,
    model_family,
)

__all__ = [
    "FAMILY_NAMES",
    "SUPPORTED_ARCHITECTURES",
    "Generation",
    "LoadedModel",
    "ModelFamily",
    "UnknownArchitectureError",
    "VisionFiles",
    "family_for_architecture",
    "family_named",
    "family_of_checkpoint",
    "model_family",
]
