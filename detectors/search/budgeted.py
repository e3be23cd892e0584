"""Our budgeted search: screening, a logit-additive surrogate, and lazy greedy refinement.

1. Anchors: the original and the blank image (2 passes).
2. Screening: the insertion and deletion image of every single region (2N passes; under a
   smaller budget deletion only, since removing one region from the full image is what reveals
   a region the token cannot do without).
3. A surrogate of the model, additive in logit space: region v adds a_v to the logit of the
   insertion score and removes d_v from the logit of the deletion score.  Screening gives the
   first a_v, d_v; every later measurement of S + {v} replaces them with the increments seen at
   the current S.  The surrogate predicts F(S + {v}) for every v at the cost of arithmetic, and
   it respects saturation (a region that cannot move a saturated probability gains nothing).
4. Refinement: at each step, score S + {v} for the `candidates` regions the surrogate ranks
   highest; accept the best measured one if no unmeasured prediction beats it (lazy greedy, as
   in CELF), otherwise measure the next `candidates`.  When a measurement misses the surrogate's
   prediction by more than `refresh_tolerance` logits (interactions between regions), the whole
   pool is re-measured at this S if at most half of the remaining budget pays for it.  Once one
   side has reached its goal (say the deletion image already lost 90% of what it can lose), only
   the other side is measured (half the passes); the chosen region's other image is scored once.
   Step 1 is free: its masks were scored by the screening and come from the cache.  When the
   chosen regions suffice but necessity is short of its goal and the surrogate predicts no
   region that brings it closer
   (redundant evidence: the token survives the loss of any one region), the whole pool is
   measured once in the current context, budget permitting.
5. Stop when the compact set explains the token (insight >= coverage * p_full and necessity >=
   coverage * (1 - p_blank); unless `stop_when_converged` is off, for a finer ordering of the
   rest), when `max_regions` are chosen, or when the budget runs out.  The
   regions left are ordered by continuing the greedy search on the surrogate (free).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from detectors.budget import SearchBudget
from detectors.search.evaluator import MaskEvaluator, objective
from detectors.search.trace import SearchTrace
from detectors.types import StopReason

__all__ = ["LogitSurrogate", "budgeted_greedy"]

_EPS = 1e-15  # float64 resolves 1 - p down to ~1e-16: keep what a probability says
Objective = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return np.asarray(np.log(p) - np.log1p(-p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


class LogitSurrogate:
    """Predicts insertion and deletion scores of S + {v} from per-region logit increments.

    A region's increment depends on its context: alone on a blank image it adds `a0_v` to the
    insertion logit, and removed from the full image it takes `d0_v` from the deletion logit;
    the difference is its interaction with the other regions.  With k regions already chosen, a
    region's insertion context holds k regions and its deletion context N - 1 - k, so the
    surrogate moves each increment linearly with the context size from its latest measurement
    (for a model additive in logit space a0 = d0 and the prediction is exact).

    Arrays are `(N, T)` for increments and `(T,)` for logits, T = explained targets."""

    def __init__(
        self,
        insertion_gain: np.ndarray,
        deletion_drop: np.ndarray,
        blank: np.ndarray,
        full: np.ndarray,
    ) -> None:
        n = insertion_gain.shape[0]
        self.n = n
        self.slope = (deletion_drop - insertion_gain) / max(1, n - 1)
        self.a = insertion_gain.copy()  # latest insertion increment, measured at context a_at
        self.a_at = np.zeros(n)
        self.d = deletion_drop.copy()  # latest deletion drop, measured at context d_at
        self.d_at = np.full(n, n - 1.0)
        self.k = 0
        self.ins_logit = _logit(blank)
        self.del_logit = _logit(full)

    def predict(self, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(M, T)` predicted insertion and deletion scores of S + {v} for v in `regions`."""
        slope = self.slope[regions]
        a = self.a[regions] + (self.k - self.a_at[regions])[:, None] * slope
        d = self.d[regions] + (self.n - 1 - self.k - self.d_at[regions])[:, None] * slope
        return _sigmoid(self.ins_logit[None] + a), _sigmoid(self.del_logit[None] - d)

    def observe(self, region: int, ins: np.ndarray, dele: np.ndarray) -> None:
        """Measured scores of S + {region}: its increments in the current context."""
        self.a[region] = _logit(ins) - self.ins_logit
        self.a_at[region] = self.k
        self.d[region] = self.del_logit - _logit(dele)
        self.d_at[region] = self.n - 1 - self.k

    def advance(self, ins: np.ndarray, dele: np.ndarray) -> None:
        """S grew by one region whose S + {v} scores were `ins`, `dele`."""
        self.ins_logit = _logit(ins)
        self.del_logit = _logit(dele)
        self.k += 1


def budgeted_greedy(
    evaluator: MaskEvaluator,
    columns: np.ndarray,
    weights: tuple[float, float],
    budget: SearchBudget,
    *,
    candidates: int = 2,
    coverage: float = 0.9,
    refresh_tolerance: float = 1.0,
    stop_when_converged: bool = True,
) -> tuple[SearchTrace, list[int]]:
    """Run the budgeted search; see the module docstring.  Never spends more than the budget.

    `refresh_tolerance` is the prediction error, in logits, beyond which the surrogate counts
    as surprised and the whole pool is re-measured (when the budget allows)."""
    n = evaluator.n_regions
    trace = SearchTrace(n_regions=n, columns=columns)

    def f_of(ins: np.ndarray, dele: np.ndarray) -> np.ndarray:
        return objective(ins, dele, weights)

    anchors = evaluator.evaluate(np.stack([np.ones(n, np.bool_), np.zeros(n, np.bool_)]))
    if anchors.shape[0] < 2:
        # Only a time budget can stop the search before its first two passes.
        raise TimeoutError(
            "the time budget ran out before the original and blank image were scored"
        )
    full, blank = anchors
    trace.record_anchors(full, blank)
    surrogate = _screen(evaluator, n, full[columns], blank[columns], columns)

    chosen = np.zeros(n, dtype=np.bool_)
    pool = list(range(n))
    ins_goal = coverage * float(full[columns].mean())
    nec_goal = coverage * float(1.0 - blank[columns].mean())
    current_ins, current_del = blank, full
    blind_probe_done = False

    while pool:
        if evaluator.stop_reason is not None:
            trace.stopped_by = evaluator.stop_reason
            break
        if budget.max_regions is not None and len(trace.selected) >= budget.max_regions:
            trace.stopped_by = StopReason.MAX_REGIONS
            break
        # A side that has reached its goal barely moves F any more: measure only the other one
        # (half the passes) and take the saturated side from the surrogate.
        side = "both"
        if float(1.0 - current_del[columns].mean()) >= nec_goal:
            side = "insertion"
        elif float(current_ins[columns].mean()) >= ins_goal:
            side = "deletion"
        step = _Step(evaluator, surrogate, chosen, columns, f_of, side)
        pool_arr = np.asarray(pool)
        predicted = f_of(*surrogate.predict(pool_arr))
        ranked = [pool[i] for i in np.lexsort((pool_arr, -predicted))]
        predicted_of = dict(zip(pool, predicted, strict=True))
        start, width = 0, candidates
        if side == "deletion" and not blind_probe_done:
            # The chosen regions suffice, necessity is short of its goal, and the surrogate
            # sees no region that brings it closer: the evidence is redundant (the token
            # survives the loss of any one region), which an additive surrogate cannot see.
            # Measure the whole pool once in this context, if at most half of the remaining
            # budget pays for it.
            need = nec_goal - float(1.0 - current_del[columns].mean())
            _, predicted_del = surrogate.predict(pool_arr)
            best_drop = float((current_del[columns].mean() - predicted_del.mean(axis=1)).max())
            cost = len(ranked) * (2 if side == "both" else 1)
            remaining = evaluator.remaining_passes
            if (
                len(trace.selected) > 0
                and need > 0
                and best_drop < 0.1 * need
                and (remaining is None or 2 * cost <= remaining)
            ):
                width = len(ranked)
                blind_probe_done = True
        while start < len(ranked):
            group = ranked[start : start + width]
            start += len(group)
            surprise, complete = step.measure(group)
            if not complete or start >= len(ranked):
                break
            # The surrogate misjudged this context (interactions): re-measure the whole pool
            # when at most half of what is left of the budget pays for it.
            left = len(ranked) - start
            remaining = evaluator.remaining_passes
            cost = left * (2 if side == "both" else 1)
            if surprise > refresh_tolerance and (remaining is None or 2 * cost <= remaining):
                width = left
                continue
            if step.best_gain() >= predicted_of[ranked[start]]:
                break
        selection = step.select()
        if selection is None:
            trace.stopped_by = evaluator.stop_reason or StopReason.FORWARD_BUDGET
            break
        region, current_ins, current_del = selection
        trace.select(region, current_ins, current_del)
        surrogate.advance(current_ins[columns], current_del[columns])
        chosen[region] = True
        pool.remove(region)
        if (
            stop_when_converged
            and float(current_ins[columns].mean()) >= ins_goal
            and float(1.0 - current_del[columns].mean()) >= nec_goal
        ):
            trace.stopped_by = StopReason.CONVERGED
            break
    else:
        trace.stopped_by = StopReason.CONVERGED

    return trace, [*trace.selected, *_surrogate_greedy(surrogate, pool, f_of)]


class _Step:
    """The measurements of one greedy step: S + {v} for the candidates it tries.

    `side` says which images are scored: `both`, or only `insertion` / `deletion` (the other
    side is predicted by the surrogate; the chosen region's is scored once at `select`)."""

    def __init__(
        self,
        evaluator: MaskEvaluator,
        surrogate: LogitSurrogate,
        chosen: np.ndarray,
        columns: np.ndarray,
        f_of: Objective,
        side: str,
    ) -> None:
        self.evaluator, self.surrogate, self.chosen = evaluator, surrogate, chosen
        self.columns, self.f_of, self.side = columns, f_of, side
        self.gain: dict[int, float] = {}
        self.rows: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {}

    def measure(self, group: list[int]) -> tuple[float, bool]:
        """Score the group; returns (largest prediction error in logits, all scored)."""
        n = self.chosen.size
        inserted = np.repeat(self.chosen[None], len(group), axis=0)
        inserted[np.arange(len(group)), group] = True
        cols = self.columns
        if self.side != "both":
            # keep one pass back so the chosen region's other side can still be scored
            afford = self.evaluator.affordable(len(group) + 1) - 1
            group, inserted = group[: max(0, afford)], inserted[: max(0, afford)]
            if not group:
                return 0.0, False
        predicted_ins, predicted_del = self.surrogate.predict(np.asarray(group))
        if self.side == "both":
            pairs = np.empty((2 * len(group), n), dtype=np.bool_)
            pairs[0::2], pairs[1::2] = inserted, ~inserted
            scores = self.evaluator.evaluate(pairs)
            got = scores.shape[0] // 2
            ins_rows, del_rows = scores[0 : 2 * got : 2], scores[1 : 2 * got : 2]
        elif self.side == "insertion":
            ins_rows = self.evaluator.evaluate(inserted)
            got = ins_rows.shape[0]
            del_rows = None
        else:
            del_rows = self.evaluator.evaluate(~inserted)
            got = del_rows.shape[0]
            ins_rows = None
        surprise = 0.0
        for i in range(got):
            v = group[i]
            ins_row = None if ins_rows is None else ins_rows[i]
            del_row = None if del_rows is None else del_rows[i]
            ins = predicted_ins[i] if ins_row is None else ins_row[cols]
            dele = predicted_del[i] if del_row is None else del_row[cols]
            if ins_row is not None:
                surprise = max(
                    surprise, float(np.abs(_logit(ins) - _logit(predicted_ins[i])).max())
                )
            if del_row is not None:
                surprise = max(
                    surprise, float(np.abs(_logit(dele) - _logit(predicted_del[i])).max())
                )
            self.surrogate.observe(v, ins, dele)
            self.gain[v] = float(self.f_of(ins[None], dele[None])[0])
            self.rows[v] = (ins_row, del_row)
        return surprise, got == len(group) and got > 0

    def best_gain(self) -> float:
        return max(self.gain.values())

    def select(self) -> tuple[int, np.ndarray, np.ndarray] | None:
        """The best measured region with both of its score rows, or None if none was measured
        (or its other side could not be scored within the budget)."""
        if not self.gain:
            return None
        region = min(self.gain, key=lambda v: (-self.gain[v], v))
        ins_row, del_row = self.rows[region]
        if ins_row is None or del_row is None:
            keep = self.chosen.copy()
            keep[region] = True
            other = self.evaluator.evaluate((keep if ins_row is None else ~keep)[None])
            if other.shape[0] == 0:
                return None
            ins_row = other[0] if ins_row is None else ins_row
            del_row = other[0] if del_row is None else del_row
        return region, ins_row, del_row


def _surrogate_greedy(surrogate: LogitSurrogate, pool: list[int], f_of: Objective) -> list[int]:
    """Order the regions left by continuing the greedy search on the surrogate alone."""
    rest = list(pool)
    order: list[int] = []
    while rest:
        arr = np.asarray(rest)
        ins, dele = surrogate.predict(arr)
        best = int(np.lexsort((arr, -f_of(ins, dele)))[0])
        order.append(rest.pop(best))
        surrogate.advance(ins[best], dele[best])
    return order


def _screen(
    evaluator: MaskEvaluator, n: int, full: np.ndarray, blank: np.ndarray, columns: np.ndarray
) -> LogitSurrogate:
    """Single-region insertion and deletion scores, as far as the budget allows."""
    eye = np.eye(n, dtype=np.bool_)
    t = columns.size
    a = np.full((n, t), np.nan)
    d = np.full((n, t), np.nan)
    if evaluator.affordable(2 * n) >= 2 * n:
        pairs = np.empty((2 * n, n), dtype=np.bool_)
        pairs[0::2], pairs[1::2] = eye, ~eye
        scores = evaluator.evaluate(pairs)[:, columns]
        got = scores.shape[0] // 2
        a[:got] = _logit(scores[0 : 2 * got : 2]) - _logit(blank)[None]
        d[:got] = _logit(full)[None] - _logit(scores[1 : 2 * got : 2])
    else:
        # Deletion only; a region's insertion increment is taken to mirror its deletion drop.
        scores = evaluator.evaluate(~eye)[:, columns]
        got = scores.shape[0]
        d[:got] = _logit(full)[None] - _logit(scores)
        a[:got] = d[:got]
    for arr in (a, d):
        known = ~np.isnan(arr[:, 0])
        arr[~known] = arr[known].mean(axis=0) if known.any() else 0.0
    return LogitSurrogate(a, d, blank, full)
