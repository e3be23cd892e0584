"""The paper's exact greedy search (EAGLE.md section 4): the yardstick for every other search."""

from __future__ import annotations

import numpy as np

from detectors.search.evaluator import MaskEvaluator, objective
from detectors.search.trace import SearchTrace
from detectors.types import StopReason

__all__ = ["exact_greedy"]


def exact_greedy(
    evaluator: MaskEvaluator, columns: np.ndarray, weights: tuple[float, float]
) -> tuple[SearchTrace, list[int]]:
    """Order all N regions greedily by F, scoring the insertion and deletion image of S + {v}
    for every region v left in the pool at every step: exactly N(N + 1) forward passes
    (the evaluator must not cache).  Ties go to the lowest region id."""
    n = evaluator.n_regions
    trace = SearchTrace(n_regions=n, columns=columns)
    chosen = np.zeros(n, dtype=np.bool_)
    pool = list(range(n))
    while pool:
        m = len(pool)
        inserted = np.repeat(chosen[None], m, axis=0)
        inserted[np.arange(m), pool] = True
        scores = evaluator.evaluate(np.concatenate([inserted, ~inserted]))
        if scores.shape[0] != 2 * m:
            raise RuntimeError("the exact search ran under a budget; use SearchBudget.exhaustive()")
        ins, dele = scores[:m], scores[m:]
        gains = objective(ins[:, columns], dele[:, columns], weights)
        best = int(np.argmax(gains))
        region = pool.pop(best)
        chosen[region] = True
        trace.select(region, ins[best], dele[best])
    # The last step scored the original image (insertion of V) and the blank one (deletion of V).
    full, blank = trace.insertion[n], trace.deletion[n]
    trace.record_anchors(full, blank)
    trace.stopped_by = StopReason.COMPLETE
    return trace, list(trace.selected)
