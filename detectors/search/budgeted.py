"""Our budgeted search: screening, then lazy greedy refinement of the leading candidates.

1. Anchors: the original and the blank image (2 passes).
2. Screening: the insertion and deletion image of every single region (2N passes, fewer when
   the budget is smaller: deletion first, since removing one region from the full image is what
   reveals a region a token cannot do without).  Each region gets an estimated gain.
3. Refinement: at each step, score S + {v} for the `candidates` regions with the highest
   estimated gain; accept the best fresh gain if no stale estimate left could beat it (lazy
   greedy, as in CELF), otherwise score the next `candidates`.  Fresh gains replace estimates.
   Step 1 is free: its masks were scored by the screening and come from the cache.
4. Stop when the compact set explains the token (insight >= coverage * p_full and necessity >=
   coverage * (1 - p_blank)), when `max_regions` are chosen, or when the budget runs out; the
   regions left are ordered by their latest estimate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from detectors.budget import SearchBudget
from detectors.search.evaluator import MaskEvaluator, objective
from detectors.search.trace import SearchTrace
from detectors.types import StopReason

__all__ = ["budgeted_greedy"]


def budgeted_greedy(
    evaluator: MaskEvaluator,
    columns: np.ndarray,
    weights: tuple[float, float],
    budget: SearchBudget,
    *,
    candidates: int = 4,
    coverage: float = 0.9,
) -> tuple[SearchTrace, list[int]]:
    """Run the budgeted search; see the module docstring.  Never spends more than the budget."""
    n = evaluator.n_regions
    trace = SearchTrace(n_regions=n, columns=columns)

    def gain_of(ins: np.ndarray, dele: np.ndarray) -> np.ndarray:
        return objective(ins[:, columns], dele[:, columns], weights)

    anchors = evaluator.evaluate(np.stack([np.ones(n, np.bool_), np.zeros(n, np.bool_)]))
    if anchors.shape[0] < 2:
        # Only a time budget can stop the search before its first two passes.
        raise TimeoutError("the time budget ran out before the original and blank image were scored")
    full, blank = anchors
    trace.record_anchors(full, blank)
    f_current = float(gain_of(blank[None], full[None])[0])

    estimate = _screen(evaluator, gain_of, n) - f_current
    chosen = np.zeros(n, dtype=np.bool_)
    pool = list(range(n))
    ins_goal = coverage * float(full[columns].mean())
    nec_goal = coverage * float(1.0 - blank[columns].mean())

    while pool:
        if evaluator.stop_reason is not None:
            trace.stopped_by = evaluator.stop_reason
            break
        if budget.max_regions is not None and len(trace.selected) >= budget.max_regions:
            trace.stopped_by = StopReason.MAX_REGIONS
            break
        ranked = sorted(pool, key=lambda v: (-estimate[v], v))
        fresh: dict[int, tuple[float, np.ndarray, np.ndarray]] = {}
        start = 0
        while start < len(ranked):
            group = ranked[start : start + candidates]
            start += len(group)
            inserted = np.repeat(chosen[None], len(group), axis=0)
            inserted[np.arange(len(group)), group] = True
            pairs = np.empty((2 * len(group), n), dtype=np.bool_)
            pairs[0::2], pairs[1::2] = inserted, ~inserted
            scores = evaluator.evaluate(pairs)
            complete = scores.shape[0] // 2
            if complete:
                gains = gain_of(scores[0 : 2 * complete : 2], scores[1 : 2 * complete : 2])
                for i in range(complete):
                    v = group[i]
                    estimate[v] = gains[i] - f_current
                    fresh[v] = (float(gains[i]), scores[2 * i], scores[2 * i + 1])
            if complete < len(group):
                break
            best_fresh = max(g for g, _, _ in fresh.values()) - f_current
            if start >= len(ranked) or best_fresh >= estimate[ranked[start]]:
                break
        if not fresh:
            trace.stopped_by = evaluator.stop_reason or StopReason.FORWARD_BUDGET
            break
        region = min(fresh, key=lambda v: (-fresh[v][0], v))
        f_current, ins_row, del_row = fresh[region]
        trace.select(region, ins_row, del_row)
        chosen[region] = True
        pool.remove(region)
        if (
            float(ins_row[columns].mean()) >= ins_goal
            and float(1.0 - del_row[columns].mean()) >= nec_goal
        ):
            trace.stopped_by = StopReason.CONVERGED
            break
    else:
        trace.stopped_by = StopReason.CONVERGED

    rest = sorted(pool, key=lambda v: (-estimate[v], v))
    return trace, [*trace.selected, *rest]


GainFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _screen(evaluator: MaskEvaluator, gain_of: GainFunction, n: int) -> np.ndarray:
    """F({v}) per region as far as the budget allows; unscreened parts borrow the mean."""
    eye = np.eye(n, dtype=np.bool_)
    budget_rows = evaluator.affordable(2 * n)
    full_screen = budget_rows >= 2 * n
    f_single = np.full(n, np.nan)
    if full_screen:
        pairs = np.empty((2 * n, n), dtype=np.bool_)
        pairs[0::2], pairs[1::2] = eye, ~eye
        scores = evaluator.evaluate(pairs)
        complete = scores.shape[0] // 2
        if complete:
            f_single[:complete] = gain_of(scores[0 : 2 * complete : 2], scores[1 : 2 * complete : 2])
    else:
        # Deletion only: keep the insertion side at its blank value for the estimate.
        anchors = evaluator.evaluate(np.stack([np.zeros(n, np.bool_)]))
        scores = evaluator.evaluate(~eye)
        got = scores.shape[0]
        if got:
            blank = np.repeat(anchors, got, axis=0)
            f_single[:got] = gain_of(blank, scores)
    known = ~np.isnan(f_single)
    fallback = float(f_single[known].mean()) if known.any() else 0.0
    return np.where(known, f_single, fallback)
