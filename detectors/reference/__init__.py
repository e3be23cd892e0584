"""The reference world: scenes with known ground truth for the project's shipped model."""

from __future__ import annotations

from pathlib import Path

from detectors.reference.world import (
    CAPTION_PROMPT,
    CLASS_NAMES,
    PAIRS,
    HallucinationKind,
    Pair,
    Question,
    Scene,
    SceneKind,
    SceneObject,
    Split,
    WorldConfig,
    generate_scene,
    question_prompt,
    split_seeds,
    training_caption,
)

MODEL_DIR = Path(__file__).resolve().parent / "model"
"""Where the shipped reference model lives (Hugging Face format)."""

__all__ = [
    "CAPTION_PROMPT",
    "CLASS_NAMES",
    "MODEL_DIR",
    "PAIRS",
    "HallucinationKind",
    "Pair",
    "Question",
    "Scene",
    "SceneKind",
    "SceneObject",
    "Split",
    "WorldConfig",
    "generate_scene",
    "question_prompt",
    "split_seeds",
    "training_caption",
]
