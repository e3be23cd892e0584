"""The budgeted search's model of the model: a surrogate additive in logit space.

Region v adds `a_v` to the logit of the insertion score (S + {v} kept, the rest filled) and
removes `d_v` from the logit of the deletion score (S + {v} removed).  The single-region
screening gives the first increments; every later measurement of S + {v} replaces them with the
increments seen at the current S.  Predicting F(S + {v}) for every v then costs arithmetic
only, and respects saturation: a region cannot move a saturated probability.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from detectors.search.evaluator import MaskEvaluator

__all__ = ["LogitSurrogate", "Objective", "logit", "screen", "sigmoid"]

_EPS = 1e-15  # float64 resolves 1 - p down to ~1e-16: keep what a probability says
# F of `(M, T)` insertion and deletion scores, one value per row
Objective = Callable[[np.ndarray, np.ndarray], np.ndarray]


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return np.asarray(np.log(p) - np.log1p(-p))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


class LogitSurrogate:
    """Predicts insertion and deletion scores of S + {v} from per-region logit increments.

    A region's increment depends on its context: alone on a blank image it adds `a0_v` to the
    insertion logit, and removed from the full image it takes `d0_v` from the deletion logit;
    the difference is its interaction with the other regions.  With k regions already chosen, a
    region's insertion context holds k regions and its deletion context N - 1 - k, so the
    surrogate moves each increment linearly with the context size from its latest measurement
    (for a model additive in logit space a0 = d0 and the prediction is exact).

    Arrays are `(N, T)` for increments and `(T,)` for logits, T = explained targets.

    `screened` marks the regions whose single-region screening was measured (the rest got the
    mean increment); `screened_gain` and `screened_drop` keep those measurements, `(N, T)`
    logits, as they were before any later step replaced them."""

    def __init__(
        self,
        insertion_gain: np.ndarray,
        deletion_drop: np.ndarray,
        blank: np.ndarray,
        full: np.ndarray,
        screened: np.ndarray | None = None,
    ) -> None:
        n = insertion_gain.shape[0]
        self.n = n
        self.screened = (
            np.zeros(n, dtype=np.bool_) if screened is None else np.asarray(screened, np.bool_)
        )
        self.screened_gain = insertion_gain.copy()
        self.screened_drop = deletion_drop.copy()
        self.slope = (deletion_drop - insertion_gain) / max(1, n - 1)
        self.a = insertion_gain.copy()  # latest insertion increment, measured at context a_at
        self.a_at = np.zeros(n)
        self.d = deletion_drop.copy()  # latest deletion drop, measured at context d_at
        self.d_at = np.full(n, n - 1.0)
        self.k = 0
        self.ins_logit = logit(blank)
        self.del_logit = logit(full)

    def predict(self, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(M, T)` predicted insertion and deletion scores of S + {v} for v in `regions`."""
        slope = self.slope[regions]
        a = self.a[regions] + (self.k - self.a_at[regions])[:, None] * slope
        d = self.d[regions] + (self.n - 1 - self.k - self.d_at[regions])[:, None] * slope
        return sigmoid(self.ins_logit[None] + a), sigmoid(self.del_logit[None] - d)

    def observe(self, region: int, ins: np.ndarray, dele: np.ndarray) -> None:
        """Measured scores of S + {region}: its increments in the current context."""
        self.a[region] = logit(ins) - self.ins_logit
        self.a_at[region] = self.k
        self.d[region] = self.del_logit - logit(dele)
        self.d_at[region] = self.n - 1 - self.k

    def advance(self, ins: np.ndarray, dele: np.ndarray) -> None:
        """S grew by one region whose S + {v} scores were `ins`, `dele`."""
        self.ins_logit = logit(ins)
        self.del_logit = logit(dele)
        self.k += 1

    def copy(self) -> LogitSurrogate:
        twin = LogitSurrogate.__new__(LogitSurrogate)
        for name, value in vars(self).items():
            setattr(twin, name, value.copy() if isinstance(value, np.ndarray) else value)
        return twin

    def take_best(self, rest: list[int], f_of: Objective) -> int:
        """One greedy step on the surrogate alone (free): remove from `rest` the region whose
        predicted F is highest (ties: the lower id), advance past it, and return it."""
        regions = np.asarray(rest)
        ins, dele = self.predict(regions)
        best = int(np.lexsort((regions, -f_of(ins, dele)))[0])
        self.advance(ins[best], dele[best])
        return rest.pop(best)


def screen(
    evaluator: MaskEvaluator, full: np.ndarray, blank: np.ndarray, columns: np.ndarray
) -> LogitSurrogate:
    """The surrogate from single-region insertion and deletion scores, as far as the budget
    allows (2N passes; under a smaller budget deletion only, a region's insertion increment
    then taken to mirror its deletion drop).  Regions left unscored get the mean increment."""
    n = evaluator.n_regions
    eye = np.eye(n, dtype=np.bool_)
    t = columns.size
    a = np.full((n, t), np.nan)
    d = np.full((n, t), np.nan)
    if evaluator.affordable(2 * n) >= 2 * n:
        pairs = np.empty((2 * n, n), dtype=np.bool_)
        pairs[0::2], pairs[1::2] = eye, ~eye
        scores = evaluator.evaluate(pairs)[:, columns]
        got = scores.shape[0] // 2
        a[:got] = logit(scores[0 : 2 * got : 2]) - logit(blank)[None]
        d[:got] = logit(full)[None] - logit(scores[1 : 2 * got : 2])
    else:
        scores = evaluator.evaluate(~eye)[:, columns]
        got = scores.shape[0]
        d[:got] = logit(full)[None] - logit(scores)
        a[:got] = d[:got]
    screened = ~np.isnan(d[:, 0])
    for arr in (a, d):
        known = ~np.isnan(arr[:, 0])
        arr[~known] = arr[known].mean(axis=0) if known.any() else 0.0
    return LogitSurrogate(a, d, blank, full, screened=screened)
