"""The guardrail sidecar: configuration, CLI, HTTP, workers and scheduler (the composition root)."""

from __future__ import annotations

from detectors.version import __version__

__all__ = ["__version__"]
