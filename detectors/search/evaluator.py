"""Scoring masks for a search: batching, caching, budget accounting, contract checks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from detectors.budget import SearchBudget
from detectors.errors import ScorerContractError
from detectors.regions import RegionPartition
from detectors.scorers.masked import MaskedBatch
from detectors.scorers.protocol import Scorer
from detectors.types import Fill, StopReason, Target

__all__ = ["MaskEvaluator", "objective"]

# A scorer may be off by float rounding at the ends of [0, 1]; anything further is a bug.
_RANGE_TOLERANCE = 1e-6


def objective(
    insertion: np.ndarray, deletion: np.ndarray, weights: tuple[float, float]
) -> np.ndarray:
    """F = lambda1 * mean insight + lambda2 * mean necessity, for `(B, T)` score rows -> `(B,)`."""
    l1, l2 = weights
    return np.asarray(l1 * insertion.mean(axis=1) + l2 * (1.0 - deletion).mean(axis=1))


class MaskEvaluator:
    """Scores `(B, R)` region selections of one image for all targets, in chunks.

    Every evaluated row costs one forward pass; a row seen before comes from the cache for free
    (unless caching is off, as in the exact search, which must spend exactly N(N + 1) passes).
    Each search runs under a budget set by `begin`; when it runs out, `evaluate` returns only the
    rows it could score (a prefix) and `stop_reason` says why.
    """

    def __init__(
        self,
        scorer: Scorer,
        image: np.ndarray,
        partition: RegionPartition,
        targets: Sequence[Target],
        *,
        fill: Fill = Fill.BLACK,
        cache: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        progress: Any | None = None,
    ) -> None:
        self.scorer = scorer
        self.image = image
        self.partition = partition
        self.targets = tuple(targets)
        self.fill = Fill(fill)
        self.n_regions = partition.n_regions
        self._cache: dict[bytes, np.ndarray] | None = {} if cache else None
        self._clock = clock
        self._progress = progress
        self.total_passes = 0
        self.begin(SearchBudget.exhaustive())

    def begin(self, budget: SearchBudget) -> None:
        """Start a search under `budget` (the cache is kept across searches)."""
        self.budget = budget
        self.passes = 0
        self.started = self._clock()
        self.chunk_size = max(1, min(budget.batch_size, int(self.scorer.max_batch_size)))
        self.stop_reason: StopReason | None = None

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started

    @property
    def remaining_passes(self) -> int | None:
        if self.budget.max_forward_passes is None:
            return None
        return max(0, self.budget.max_forward_passes - self.passes)

    def affordable(self, rows: int) -> int:
        """How many of `rows` new masks the pass budget still allows."""
        remaining = self.remaining_passes
        return rows if remaining is None else min(rows, remaining)

    def evaluate(self, keep: np.ndarray) -> np.ndarray:
        """Scores for the `(B, R)` bool selections; returns `(b, T)` for the first b <= B rows.

        b < B only when the budget ran out (then `stop_reason` is set)."""
        keep = np.ascontiguousarray(keep, dtype=np.bool_)
        keys = [np.packbits(row).tobytes() for row in keep]
        known: dict[bytes, np.ndarray] = {}
        if self._cache is not None:
            known = {k: self._cache[k] for k in keys if k in self._cache}
        pending: list[int] = []
        pending_keys: set[bytes] = set()
        for i, k in enumerate(keys):
            if k not in known and (self._cache is None or k not in pending_keys):
                pending.append(i)
                pending_keys.add(k)
        results: dict[int, np.ndarray] = {}
        done = 0
        while done < len(pending):
            size = self._next_chunk(len(pending) - done)
            if size == 0:
                break
            rows = pending[done : done + size]
            scores = self._score(keep[rows])
            for i, row_scores in zip(rows, scores, strict=True):
                results[i] = row_scores
                if self._cache is not None:
                    self._cache[keys[i]] = row_scores
                    known[keys[i]] = row_scores
            done += size
        out: list[np.ndarray] = []
        for i, k in enumerate(keys):
            row = results.get(i)
            if row is None:
                row = known.get(k)
            if row is None:
                break
            out.append(row)
        if not out:
            return np.empty((0, len(self.targets)))
        return np.stack(out)

    def _next_chunk(self, wanted: int) -> int:
        if self.budget.max_seconds is not None and self.elapsed >= self.budget.max_seconds:
            self.stop_reason = StopReason.TIME_BUDGET
            return 0
        size = self.affordable(min(wanted, self.chunk_size))
        if size == 0:
            self.stop_reason = StopReason.FORWARD_BUDGET
        return size

    def _score(self, keep: np.ndarray) -> np.ndarray:
        batch = MaskedBatch(image=self.image, partition=self.partition, keep=keep, fill=self.fill)
        scores = self.scorer.score(batch, self.targets)
        expected = (keep.shape[0], len(self.targets))
        if not isinstance(scores, np.ndarray) or scores.shape != expected:
            raise ScorerContractError(
                f"scorer {self.scorer.name!r} must return a numpy array of shape {expected} "
                f"(masked images, targets), got {getattr(scores, 'shape', type(scores).__name__)}"
            )
        scores = scores.astype(np.float64, copy=False)
        if not np.isfinite(scores).all():
            raise ScorerContractError(
                f"scorer {self.scorer.name!r} returned non-finite probabilities (NaN or inf)"
            )
        low, high = float(scores.min()), float(scores.max())
        if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ScorerContractError(
                f"scorer {self.scorer.name!r} must return probabilities in [0, 1], "
                f"got values in [{low:.6g}, {high:.6g}]"
            )
        self.passes += keep.shape[0]
        self.total_passes += keep.shape[0]
        if self._progress is not None:
            self._progress.update(keep.shape[0])
        return np.asarray(np.clip(scores, 0.0, 1.0))
