"""What a search records along its way, and how that becomes an `Attribution`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from detectors.search.evaluator import MaskEvaluator
from detectors.types import Attribution, StopReason

__all__ = ["SearchTrace", "compact_prefix"]


@dataclass(kw_only=True, slots=True)
class SearchTrace:
    """Mutable record of one search over N regions and T targets (all targets of the evaluator;
    `columns` picks the ones this search explains)."""

    n_regions: int
    columns: np.ndarray
    selected: list[int] = field(default_factory=list)
    insertion: dict[int, np.ndarray] = field(default_factory=dict)  # prefix length -> (T_all,)
    deletion: dict[int, np.ndarray] = field(default_factory=dict)
    p_full: np.ndarray | None = None
    p_blank: np.ndarray | None = None
    stopped_by: StopReason = StopReason.CONVERGED

    def record_anchors(self, full: np.ndarray, blank: np.ndarray) -> None:
        self.p_full, self.p_blank = full, blank
        self.insertion[0], self.deletion[0] = blank, full
        self.insertion[self.n_regions], self.deletion[self.n_regions] = full, blank

    def select(self, region: int, insertion: np.ndarray, deletion: np.ndarray) -> None:
        self.selected.append(region)
        self.record(len(self.selected), insertion, deletion)

    def record(self, prefix: int, insertion: np.ndarray, deletion: np.ndarray) -> None:
        """Scores of the first `prefix` regions of the order visible / removed."""
        self.insertion[prefix] = insertion
        self.deletion[prefix] = deletion


def compact_prefix(
    insertion: np.ndarray,
    deletion: np.ndarray,
    p_full: np.ndarray,
    p_blank: np.ndarray,
    coverage: float,
) -> int:
    """Length k (1 <= k < N) of the compact set along the order: the shortest scored proper
    prefix that is sufficient (mean insight >= `coverage` * p_full) *and* indispensable (mean
    necessity >= `coverage` * (1 - p_blank)); else the shortest that is sufficient; else the
    longest scored one (1 if none was scored).  The whole image trivially explains the token
    and is never chosen.

    A region set that is merely sufficient can leave the rest of the object visible; asking
    for necessity too makes the compact set cover all of the evidence.

    `insertion` and `deletion` are `(N + 1, T)` with NaN rows where a prefix was not scored."""
    n = insertion.shape[0] - 1
    ins_goal = coverage * float(p_full.mean())
    nec_goal = coverage * float(1.0 - p_blank.mean())
    insight = insertion.mean(axis=1)
    necessity = 1.0 - deletion.mean(axis=1)
    scored = [r for r in range(1, n) if not np.isnan(insight[r])]
    for r in scored:
        if insight[r] >= ins_goal and not np.isnan(necessity[r]) and necessity[r] >= nec_goal:
            return r
    for r in scored:
        if insight[r] >= ins_goal:
            return r
    return max(scored) if scored else 1


def to_attribution(
    trace: SearchTrace,
    order: list[int],
    evaluator: MaskEvaluator,
    *,
    search: str,
    weights: tuple[float, float],
    coverage: float,
    seconds: float,
    version: str,
) -> Attribution:
    """Freeze a finished trace (with its complete `order`) into an `Attribution`."""
    n = trace.n_regions
    cols = trace.columns
    if sorted(order) != list(range(n)):
        raise RuntimeError(f"search {search} produced an incomplete ordering: {order}")
    if trace.p_full is None or trace.p_blank is None:
        raise RuntimeError(f"search {search} finished without scoring the anchors")
    insertion = np.full((n + 1, cols.size), np.nan)
    deletion = np.full((n + 1, cols.size), np.nan)
    for r, row in trace.insertion.items():
        insertion[r] = row[cols]
    for r, row in trace.deletion.items():
        deletion[r] = row[cols]
    p_full = trace.p_full[cols]
    k = compact_prefix(insertion, deletion, p_full, trace.p_blank[cols], coverage)
    return Attribution(
        targets=tuple(evaluator.targets[i] for i in cols),
        partition=evaluator.partition,
        order=np.asarray(order, dtype=np.int64),
        insertion=insertion,
        deletion=deletion,
        p_full=p_full,
        p_blank=trace.p_blank[cols],
        compact_set=tuple(int(v) for v in order[:k]),
        forward_passes=evaluator.passes,
        seconds=seconds,
        stopped_by=trace.stopped_by,
        search=search,
        scorer_name=evaluator.scorer.name,
        fill=evaluator.fill,
        weights=weights,
        version=version,
    )
