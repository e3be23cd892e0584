"""The seam between the search and a model: the `Scorer` protocol."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from detectors.scorers.masked import MaskedBatch
from detectors.types import Target

__all__ = ["Scorer"]


@runtime_checkable
class Scorer(Protocol):
    """Scores masked versions of one image for the tokens being explained.

    `score` returns a `(B, len(targets))` float array: for each masked image, the probability
    the model gives each target token under teacher forcing of the tokens it generated, in
    [0, 1].  `name` identifies the model and how it runs (e.g. the ONNX Runtime provider);
    `max_batch_size` is the largest B the scorer accepts in one call.
    """

    @property
    def name(self) -> str: ...

    @property
    def max_batch_size(self) -> int: ...

    def score(self, batch: MaskedBatch, targets: Sequence[Target]) -> np.ndarray: ...
