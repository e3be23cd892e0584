"""Cross-evidence between the object words of one output: whose regions does each rely on?"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detectors.budget import SearchBudget
from detectors.search.evaluator import MaskEvaluator
from detectors.types import Attribution, CrossEvidence

__all__ = ["cross_evidence"]


def cross_evidence(
    evaluator: MaskEvaluator, attributions: Sequence[Attribution], batch_size: int
) -> CrossEvidence:
    """For every pair of targets (i, j), score target i with j's compact set removed, and with
    i's own compact set minus j's removed.

    The first masks were usually scored already (as j's deletion images) and come from the
    cache; the second cost one pass per pair.  All in one batch of the evaluator."""
    t = len(attributions)
    sets = [np.asarray(a.compact_set, dtype=np.int64) for a in attributions]
    n = evaluator.n_regions
    without = np.full((t, t), np.nan)
    own_only = np.full((t, t), np.nan)
    evaluator.begin(SearchBudget(batch_size=batch_size))
    keeps: list[np.ndarray] = []
    slots: list[tuple[str, int, int]] = []
    for j in range(t):
        keep = np.ones(n, dtype=np.bool_)
        keep[sets[j]] = False
        keeps.append(keep)
        slots.append(("without", -1, j))
    for i in range(t):
        for j in range(t):
            if i == j:
                continue
            own = np.setdiff1d(sets[i], sets[j])
            keep = np.ones(n, dtype=np.bool_)
            keep[own] = False
            keeps.append(keep)
            slots.append(("own", i, j))
    scores = evaluator.evaluate(np.stack(keeps))
    for (kind, i, j), row in zip(slots, scores, strict=True):
        if kind == "without":
            without[:, j] = row
        else:
            own_only[i, j] = row[i]
    for j in range(t):
        without[j, j] = np.nan
    return CrossEvidence(
        without_other=without, own_only_removed=own_only, forward_passes=evaluator.passes
    )
