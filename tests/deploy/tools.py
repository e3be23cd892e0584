"""What the deployment tests need beyond Python: skipped with the reason when missing, failed
instead when `.ci/run` says the tool is required."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"


def executable(name: str, require_env: str, install: str) -> str:
    """The path of `name`, or skip (fail when `require_env` is "1") saying how to install it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed ({install})"
        if os.environ.get(require_env) == "1":
            pytest.fail(f"{name} is required: {install}")
        pytest.skip(message)
    return path
