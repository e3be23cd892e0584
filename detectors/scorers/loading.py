"""Finding out what a local checkpoint directory holds, before anything heavy is imported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detectors.errors import DetectorError, MissingDependencyError

__all__ = [
    "DTYPES",
    "ModelLoadError",
    "checkpoint_config",
    "load_pretrained",
    "load_processors",
    "require_architecture",
    "torch_dtype",
]

# weights dtypes a scorer loads a model in; float32 by default, whatever the checkpoint was saved
# in (transformers would otherwise load a float16 checkpoint as float16, on the CPU too)
DTYPES = ("float32", "bfloat16", "float16")


class ModelLoadError(DetectorError, ValueError):
    """A model directory is missing, incomplete or of an unsupported architecture."""


def checkpoint_config(model_dir: str | Path) -> dict[str, Any]:
    """The parsed config.json of a local Hugging Face checkpoint (never a hub id).

    Raises:
        ModelLoadError: the directory does not exist or holds no readable config.json.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json: not a Hugging Face checkpoint")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{str(config_file)!r} is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{str(config_file)!r} does not hold a JSON object")
    return config


def torch_dtype(name: str) -> Any:
    """The torch dtype called `name` (one of `DTYPES`).

    Raises:
        ValueError: another name.
    """
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    import torch

    return getattr(torch, name)


def require_architecture(model_dir: str | Path, architecture: str) -> None:
    """Check that the checkpoint in `model_dir` is a `architecture` one.

    Raises:
        ModelLoadError: missing directory, no config, or another architecture.
    """
    architectures = checkpoint_config(model_dir).get("architectures") or []
    if architecture not in architectures:
        raise ModelLoadError(
            f"{str(model_dir)!r} holds {architectures or 'an unknown architecture'}; "
            f"supported: {architecture}"
        )


def load_pretrained(
    model_dir: str | Path,
    architecture: str,
    *,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> Any:
    """The `architecture` model (transformers' class of that name) of the checkpoint in
    `model_dir`, from local files only, in `dtype`, on `device`, in eval mode; `threads` sets
    torch's intra-op threads first.

    Raises:
        ModelLoadError: missing directory, no config, or another architecture.
        MissingDependencyError: torch or transformers is not installed.
        ValueError: an unknown dtype.
    """
    require_architecture(model_dir, architecture)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        import torch
        import transformers
    except ImportError as exc:  # pragma: no cover - core dependencies
        raise MissingDependencyError(
            f"scoring a {architecture} model needs torch and transformers: "
            "pip install eagle-guardrail"
        ) from exc
    if threads:
        torch.set_num_threads(threads)
    model_class = getattr(transformers, architecture)
    model = model_class.from_pretrained(
        Path(model_dir), local_files_only=True, dtype=torch_dtype(dtype)
    )
    model.to(torch.device(device)).eval()
    return model


def load_processors(model_dir: str | Path, image_processor: str) -> tuple[Any, Any]:
    """The image processor (transformers' class called `image_processor`) and the tokenizer of
    the checkpoint in `model_dir`, from local files only: for a family whose processor class
    cannot be loaded whole (its video processor needs torchvision, which is not installed)."""
    import transformers

    processor_class = getattr(transformers, image_processor)
    return (
        processor_class.from_pretrained(Path(model_dir), local_files_only=True),
        transformers.AutoTokenizer.from_pretrained(Path(model_dir), local_files_only=True),
    )
