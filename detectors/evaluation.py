"""Faithfulness, localisation and hallucination metrics (EAGLE.md section 8).

The x axis of every curve is the cumulative area fraction of the first r regions of an
ordering (a_0 = 0, a_N = 1).  Any saliency map can be scored the same way after
`order_from_saliency` turns it into an ordering of the same regions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from detectors.regions import RegionPartition
from detectors.scorers.masked import MaskedBatch
from detectors.scorers.protocol import Scorer
from detectors.types import Attribution, Fill, Target

__all__ = [
    "amcr",
    "area_fractions",
    "auroc",
    "average_highest_confidence",
    "csr_at",
    "deletion_auc",
    "insertion_auc",
    "minimal_correction_region",
    "objective_area",
    "order_curves",
    "order_from_saliency",
    "pointing_game",
    "pointing_game_score",
    "sensitive_tokens",
]


def area_fractions(partition: RegionPartition, order: np.ndarray) -> np.ndarray:
    """`(N + 1,)` cumulative area fraction of the first r regions of `order`."""
    _check_order(order, partition.n_regions)
    return np.concatenate([[0.0], np.cumsum(partition.area_fractions[order])])


def order_curves(
    scorer: Scorer,
    image: np.ndarray,
    partition: RegionPartition,
    order: np.ndarray,
    targets: Sequence[Target],
    *,
    fill: Fill = Fill.BLACK,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Score a complete ordering: `(insertion, deletion)`, each `(N + 1, T)`; insertion row r
    keeps only the first r regions, deletion row r removes them.  Costs 2(N + 1) passes."""
    n = partition.n_regions
    _check_order(order, n)
    prefix = np.zeros((n + 1, n), dtype=np.bool_)
    for r in range(1, n + 1):
        prefix[r] = prefix[r - 1]
        prefix[r, order[r - 1]] = True
    keep = np.concatenate([prefix, ~prefix])
    size = max(1, min(batch_size, int(scorer.max_batch_size)))
    rows = [
        scorer.score(
            MaskedBatch(image=image, partition=partition, keep=keep[i : i + size], fill=fill),
            targets,
        )
        for i in range(0, keep.shape[0], size)
    ]
    scores = np.concatenate(rows)
    return scores[: n + 1], scores[n + 1 :]


def objective_area(
    insertion: np.ndarray, deletion: np.ndarray, weights: tuple[float, float] = (1.0, 1.0)
) -> float:
    """Area under the search objective F = l1 * insight + l2 * necessity along an ordering
    (mean over targets), x = r / N: what the searches are compared on (attainment).
    `insertion` and `deletion` are `(N + 1, T)`, as from `order_curves`."""
    n = insertion.shape[0] - 1
    l1, l2 = weights
    curve = l1 * insertion.mean(axis=1) + l2 * (1.0 - deletion.mean(axis=1))
    return float(np.trapezoid(curve, np.linspace(0.0, 1.0, n + 1)))


def insertion_auc(fractions: np.ndarray, insertion: np.ndarray) -> float:
    """Trapezoid area under the insertion curve (`(N + 1,)` or `(N + 1, T)`, mean over
    targets), starting at the blank image's score.  Higher is better."""
    return _mean_auc(fractions, insertion)


def deletion_auc(fractions: np.ndarray, deletion: np.ndarray) -> float:
    """Trapezoid area under the deletion curve, starting at the original's score.  Lower is
    better."""
    return _mean_auc(fractions, deletion)


def attribution_aucs(attribution: Attribution) -> tuple[float, float]:
    """(insertion AUC, deletion AUC) of an attribution whose curves are fully scored."""
    if np.isnan(attribution.insertion).any() or np.isnan(attribution.deletion).any():
        raise ValueError(
            "the attribution's curves are not fully scored (budgeted search); "
            "score its order with order_curves first"
        )
    fractions = area_fractions(attribution.partition, attribution.order)
    return insertion_auc(fractions, attribution.insertion), deletion_auc(
        fractions, attribution.deletion
    )


def average_highest_confidence(insertion_curves: Sequence[np.ndarray]) -> float:
    """Mean over samples of the maximum of each insertion curve."""
    if not insertion_curves:
        raise ValueError("average_highest_confidence needs at least one curve")
    return float(np.mean([np.nanmax(c) for c in insertion_curves]))


def sensitive_tokens(p_full: np.ndarray, p_blank: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Bool mask of visually sensitive tokens: s(original) - s(blank) > `threshold`."""
    return np.asarray(np.asarray(p_full) - np.asarray(p_blank) > threshold)


def pointing_game(
    saliency: np.ndarray,
    *,
    box: tuple[int, int, int, int] | None = None,
    mask: np.ndarray | None = None,
) -> bool:
    """A hit when the saliency maximum lies inside the object's box `(x0, y0, x1, y1)`
    (exclusive ends) or pixel mask.  Region-constant maps have a whole region at the maximum;
    its location is the maximal pixel nearest the centroid of all maximal pixels."""
    if (box is None) == (mask is None):
        raise ValueError("give exactly one of box or mask")
    ys, xs = np.nonzero(saliency >= saliency.max())
    cy, cx = ys.mean(), xs.mean()
    nearest = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    y, x = int(ys[nearest]), int(xs[nearest])
    if box is not None:
        x0, y0, x1, y1 = box
        return x0 <= x < x1 and y0 <= y < y1
    assert mask is not None
    if mask.shape != saliency.shape:
        raise ValueError(f"mask shape {mask.shape} does not match saliency {saliency.shape}")
    return bool(mask[y, x])


def pointing_game_score(hits: Sequence[bool]) -> float:
    """Hit rate."""
    if not hits:
        raise ValueError("pointing_game_score needs at least one result")
    return float(np.mean(hits))


def minimal_correction_region(
    partition: RegionPartition,
    order: np.ndarray,
    is_correct: Callable[[np.ndarray], bool],
) -> float:
    """MCR of one hallucinated answer: remove the tail of `order` one region at a time from the
    full image and ask `is_correct(keep)` (keep: `(R,)` bool) whether the regenerated answer
    is now correct; the removed area fraction at the first correct answer, 1.0 if never."""
    n = partition.n_regions
    _check_order(order, n)
    keep = np.ones(n, dtype=np.bool_)
    fractions = partition.area_fractions
    removed = 0.0
    for region in order[::-1]:
        keep[region] = False
        removed += float(fractions[region])
        if is_correct(keep.copy()):
            return min(1.0, removed)
    return 1.0


def amcr(mcrs: Sequence[float]) -> float:
    """Average minimal correction region (lower is better)."""
    if not mcrs:
        raise ValueError("amcr needs at least one sample")
    return float(np.mean(mcrs))


def csr_at(mcrs: Sequence[float], k: float = 0.10) -> float:
    """Share of *all* samples corrected by removing at most `k` of the image (never-corrected
    samples count in the denominator, unlike the authors' script)."""
    if not mcrs:
        raise ValueError("csr_at needs at least one sample")
    return float(np.mean(np.asarray(mcrs) <= k + 1e-12))


def order_from_saliency(partition: RegionPartition, saliency: np.ndarray) -> np.ndarray:
    """Order regions by their mean saliency, hottest first (ties by region id)."""
    if saliency.shape != partition.shape:
        raise ValueError(f"saliency shape {saliency.shape} != partition shape {partition.shape}")
    sums = np.bincount(
        partition.labels.ravel(), weights=saliency.ravel(), minlength=partition.n_regions
    )
    means = sums / partition.areas
    return np.lexsort((np.arange(partition.n_regions), -means))


def _mean_auc(fractions: np.ndarray, curve: np.ndarray) -> float:
    curve = np.asarray(curve, dtype=np.float64)
    if curve.ndim == 1:
        curve = curve[:, None]
    if curve.shape[0] != fractions.shape[0]:
        raise ValueError(f"curve has {curve.shape[0]} points, fractions {fractions.shape[0]}")
    if np.isnan(curve).any():
        raise ValueError("the curve has unscored (NaN) points; score the order with order_curves")
    return float(np.mean([np.trapezoid(curve[:, t], fractions) for t in range(curve.shape[1])]))


def _check_order(order: np.ndarray, n: int) -> None:
    if sorted(np.asarray(order).tolist()) != list(range(n)):
        raise ValueError(f"order must hold every region id 0..{n - 1} exactly once")


def auroc(scores: Sequence[float] | np.ndarray, positives: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative (ties count half).  NaN when either class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives, dtype=np.bool_)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
