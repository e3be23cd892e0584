"""The authors' faster greedy variant (EAGLE.md section 4), as a baseline for our search.

Every `update_step` steps the whole pool is scored and ranked; in between only the top
`search_scope` candidates of the latest ranking are re-scored.  At each full refresh the
`pending_samples` lowest-ranked regions leave the pool and fill the order from the back.
Under a finite budget it stops when the budget runs out and orders the pool by its ranking.
"""

from __future__ import annotations

import numpy as np

from detectors.search.evaluator import MaskEvaluator, objective
from detectors.search.trace import SearchTrace
from detectors.types import StopReason

__all__ = ["efficient_greedy"]


def efficient_greedy(
    evaluator: MaskEvaluator,
    columns: np.ndarray,
    weights: tuple[float, float],
    *,
    search_scope: int = 8,
    update_step: int = 4,
    pending_samples: int = 2,
) -> tuple[SearchTrace, list[int]]:
    """Run the authors' efficient variant; returns the trace and the complete order."""
    if search_scope < 1 or update_step < 1 or pending_samples < 0:
        raise ValueError(
            "search_scope and update_step must be positive and pending_samples >= 0, got "
            f"{search_scope}, {update_step}, {pending_samples}"
        )
    n = evaluator.n_regions
    trace = SearchTrace(n_regions=n, columns=columns)
    anchors = evaluator.evaluate(np.stack([np.ones(n, np.bool_), np.zeros(n, np.bool_)]))
    if anchors.shape[0] < 2:
        raise TimeoutError(
            "the time budget ran out before the original and blank image were scored"
        )
    trace.record_anchors(anchors[0], anchors[1])
    chosen = np.zeros(n, dtype=np.bool_)
    pool = list(range(n))
    ranking = list(pool)
    back: list[int] = []
    step = 0
    trace.stopped_by = StopReason.COMPLETE
    while pool:
        refresh = step % update_step == 0
        candidates = list(pool) if refresh else [v for v in ranking if v in pool][:search_scope]
        inserted = np.repeat(chosen[None], len(candidates), axis=0)
        inserted[np.arange(len(candidates)), candidates] = True
        scores = evaluator.evaluate(np.concatenate([inserted, ~inserted]))
        m = len(candidates)
        if scores.shape[0] < 2 * m:
            # Out of budget: finish with the latest ranking, no partial step.
            trace.stopped_by = evaluator.stop_reason or StopReason.FORWARD_BUDGET
            break
        gains = objective(scores[:m][:, columns], scores[m:][:, columns], weights)
        ranked = [candidates[i] for i in np.argsort(-gains, kind="stable")]
        rest = [v for v in ranking if v in pool and v not in set(candidates)]
        ranking = ranked + rest
        best = ranked[0]
        i_best = candidates.index(best)
        trace.select(best, scores[i_best], scores[m + i_best])
        chosen[best] = True
        pool.remove(best)
        ranking.remove(best)
        if refresh and pending_samples and len(pool) > pending_samples:
            tail = ranking[-pending_samples:]
            back = tail + back
            for v in tail:
                pool.remove(v)
                ranking.remove(v)
        step += 1
    remaining = [v for v in ranking if v in pool]
    return trace, [*trace.selected, *remaining, *back]
