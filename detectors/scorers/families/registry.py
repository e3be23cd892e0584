"""The model families, keyed by the architecture their checkpoints name in config.json.

Adding a family is one module under `detectors.scorers.families` and one line in `_FAMILIES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detectors.scorers.families.base import ModelFamily
from detectors.scorers.families.internvl import INTERNVL
from detectors.scorers.families.llava import LLAVA
from detectors.scorers.families.qwen2_5_vl import QWEN2_5_VL
from detectors.scorers.loading import ModelLoadError, checkpoint_config

__all__ = [
    "FAMILY_NAMES",
    "SUPPORTED_ARCHITECTURES",
    "UnknownArchitectureError",
    "family_for_architecture",
    "family_named",
    "family_of_checkpoint",
    "model_family",
]

_FAMILIES: tuple[ModelFamily[Any], ...] = (LLAVA, QWEN2_5_VL, INTERNVL)

_BY_ARCHITECTURE: dict[str, ModelFamily[Any]] = {f.architecture: f for f in _FAMILIES}
_BY_NAME: dict[str, ModelFamily[Any]] = {f.name: f for f in _FAMILIES}

# architecture in config.json -> family name used by the scorers and the config file
SUPPORTED_ARCHITECTURES: dict[str, str] = {a: f.name for a, f in _BY_ARCHITECTURE.items()}
FAMILY_NAMES: tuple[str, ...] = tuple(_BY_NAME)


class UnknownArchitectureError(ModelLoadError):
    """A checkpoint's architecture (or a family name) that no registered family serves."""


def family_for_architecture(architecture: str) -> ModelFamily[Any]:
    """The family serving checkpoints whose config.json names `architecture`.

    Raises:
        UnknownArchitectureError: no family serves it (the message names those that do).
    """
    family = _BY_ARCHITECTURE.get(architecture)
    if family is None:
        raise UnknownArchitectureError(
            f"no model family serves the architecture {architecture!r}; supported: "
            f"{', '.join(_BY_ARCHITECTURE)}"
        )
    return family


def family_named(name: str) -> ModelFamily[Any]:
    """The family called `name` ("llava", "qwen2_5_vl", "internvl").

    Raises:
        UnknownArchitectureError: no family has that name.
    """
    family = _BY_NAME.get(name)
    if family is None:
        raise UnknownArchitectureError(
            f"unknown model family {name!r}; known: {', '.join(FAMILY_NAMES)}"
        )
    return family


def family_of_checkpoint(model_dir: str | Path, expected: str | None = None) -> ModelFamily[Any]:
    """The family serving the checkpoint in `model_dir`, read from its config.json.

    Raises:
        ModelLoadError: missing directory, no config, or an architecture no family serves
            (or not the `expected` family's).
    """
    architectures = checkpoint_config(model_dir).get("architectures") or []
    found = [_BY_ARCHITECTURE[a] for a in architectures if a in _BY_ARCHITECTURE]
    wanted = [f for f in found if expected is None or f.name == expected]
    if not wanted:
        supported = ", ".join(
            a for a, f in _BY_ARCHITECTURE.items() if expected is None or f.name == expected
        )
        raise UnknownArchitectureError(
            f"{str(model_dir)!r} holds {architectures or 'an unknown architecture'}; "
            f"supported: {supported}"
        )
    return wanted[0]


def model_family(model_dir: str | Path, expected: str | None = None) -> str:
    """The name of the family serving the checkpoint in `model_dir` (see
    `family_of_checkpoint`)."""
    return family_of_checkpoint(model_dir, expected).name
