"""The cheap hallucination detectors a practitioner tries first, on the same `Scorer`.

Each baseline turns a sample's object words into one hallucination score per word (higher =
more likely hallucinated), spending forward passes that are shared by all the words of the
sample (one masked image is scored for every target at once):

- `low_confidence`: 1 - p_full (1 pass).
- `image_free_contrast`: p_blank / p_full, what the text alone predicts against what the image
  adds (2 passes).
- `contrastive_decoding`: a VCD-style contrast (Leng et al., CVPR 2024) between the image and a
  distorted copy (the whole image blurred by default): the contrastive log-probability
  (1 + alpha) log p_full - alpha log p_distorted, negated (2 passes).  Without the full
  vocabulary distribution VCD's plausibility cut-off cannot be applied; the score keeps only
  the contrast.
- `occlusion`: remove one region at a time; 1 - the largest relative drop (N + 1 passes).
- `rise`: random region subsets, each region kept with probability 1/2 (Petsiuk et al.,
  BMVC 2018, on the sample's regions instead of an upsampled grid); a region's value is
  E[p | kept] - E[p | removed], the centred RISE estimator (in expectation the same ranking as
  RISE's E[p | kept]); 1 - the largest value relative to p_full (n_masks + 1 passes).

Attention mass on image tokens is not here: the `Scorer` protocol exposes probabilities only.

Occlusion and RISE also give per-region values (`region_values`, `(R, T)`), from which
`order_from_values` makes an ordering for the insertion, deletion and correction curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from detectors.regions import RegionPartition
from detectors.scorers.masked import MaskedBatch
from detectors.scorers.protocol import Scorer
from detectors.types import DEFAULT_FILL, Fill, Target

__all__ = [
    "BASELINE_NAMES",
    "BaselineScores",
    "contrastive_decoding",
    "image_free_contrast",
    "low_confidence",
    "occlusion",
    "order_from_values",
    "rise",
    "score_selections",
]

BASELINE_NAMES = (
    "low_confidence",
    "image_free_contrast",
    "contrastive_decoding",
    "occlusion",
    "rise",
)

_EPS = 1e-12


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class BaselineScores:
    """What one baseline concluded about the object words of one sample.

    Attributes:
        name: the baseline (one of `BASELINE_NAMES`).
        scores: `(T,)` hallucination score per target, higher = more likely hallucinated.
        forward_passes: masked images scored, for all T targets together.
        region_values: `(R, T)` importance of each region for each target (higher = more
            evidence for the token), or None for baselines without a map.
        p_full: `(T,)` probability on the original image.
    """

    name: str
    scores: np.ndarray
    forward_passes: int
    p_full: np.ndarray
    region_values: np.ndarray | None = None


def score_selections(
    scorer: Scorer,
    image: np.ndarray,
    partition: RegionPartition,
    keep: np.ndarray,
    targets: Sequence[Target],
    *,
    fill: Fill | str = DEFAULT_FILL,
    batch_size: int = 16,
) -> np.ndarray:
    """`(B, T)` probabilities of `targets` for the `(B, R)` bool selections `keep` (True =
    region visible), in chunks of at most `batch_size` (and the scorer's limit)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got: {batch_size}")
    keep = np.asarray(keep, dtype=np.bool_)
    if keep.ndim != 2 or keep.shape[1] != partition.n_regions:
        raise ValueError(
            f"keep must be a (B, {partition.n_regions}) bool array, got shape {keep.shape}"
        )
    size = max(1, min(batch_size, int(scorer.max_batch_size)))
    rows = [
        scorer.score(
            MaskedBatch(image=image, partition=partition, keep=keep[i : i + size], fill=Fill(fill)),
            targets,
        )
        for i in range(0, keep.shape[0], size)
    ]
    if not rows:
        return np.zeros((0, len(targets)))
    return np.asarray(np.concatenate(rows), dtype=np.float64)


def _full_and(
    scorer: Scorer,
    image: np.ndarray,
    partition: RegionPartition,
    others: np.ndarray,
    targets: Sequence[Target],
    fill: Fill | str,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """p_full `(T,)` and the probabilities of `others` `(B, T)`, in one call."""
    n = partition.n_regions
    keep = np.concatenate([np.ones((1, n), dtype=np.bool_), others.astype(np.bool_)])
    probs = score_selections(
        scorer, image, partition, keep, targets, fill=fill, batch_size=batch_size
    )
    return probs[0], probs[1:]


def low_confidence(
    scorer: Scorer, image: np.ndarray, partition: RegionPartition, targets: Sequence[Target]
) -> BaselineScores:
    """1 - p_full: the model's own doubt (1 pass)."""
    p_full, _ = _full_and(
        scorer, image, partition, np.zeros((0, partition.n_regions)), targets, DEFAULT_FILL, 1
    )
    return BaselineScores(
        name="low_confidence", scores=1.0 - p_full, forward_passes=1, p_full=p_full
    )


def image_free_contrast(
    scorer: Scorer,
    image: np.ndarray,
    partition: RegionPartition,
    targets: Sequence[Target],
    *,
    fill: Fill | str = DEFAULT_FILL,
) -> BaselineScores:
    """p_blank / p_full (the blank image: every region filled with `fill`), 2 passes."""
    blank = np.zeros((1, partition.n_regions), dtype=np.bool_)
    p_full, rest = _full_and(scorer, image, partition, blank, targets, fill, 2)
    ratio = rest[0] / np.maximum(p_full, _EPS)
    return BaselineScores(name="image_free_contrast", scores=ratio, forward_passes=2, p_full=p_full)


def contrastive_decoding(
    scorer: Scorer,
    image: np.ndarray,
    partition: RegionPartition,
    targets: Sequence[Target],
    *,
    distortion: Fill | str = Fill.BLUR,
    alpha: float = 1.0,
) -> BaselineScores:
    """VCD-style: -((1 + alpha) log p_full - alpha log p_distorted), where the distorted image
    is the whole image replaced by `distortion` (a blur by default), 2 passes."""
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got: {alpha}")
    blank = np.zeros((1, partition.n_regions), dtype=np.bool_)
    p_full, rest = _full_and(scorer, image, partition, blank, targets, distortion, 2)
    contrast = (1.0 + alpha) * np.log(np.maximum(p_full, _EPS)) - alpha * np.log(
        np.maximum(rest[0], _EPS)
    )
    return BaselineScores(
        name="contrastive_decoding", scores=-contrast, forward_passes=2, p_full=p_full
    )


def occlusion(
    scorer: Scorer,
    image: np.ndarray,
    partition: RegionPartition,
    targets: Sequence[Target],
    *,
    fill: Fill | str = DEFAULT_FILL,
    batch_size: int = 16,
) -> BaselineScores:
    """Remove one region at a time: region value = relative drop (p_full - p_without) /
    p_full; score = 1 - the largest drop, clipped to [0, 1] (N + 1 passes)."""
    n = partition.n_regions
    singles = ~np.eye(n, dtype=np.bool_)
    p_full, without = _full_and(scorer, image, partition, singles, targets, fill, batch_size)
    drops = (p_full[None, :] - without) / np.maximum(p_full[None, :], _EPS)
    scores = 1.0 - np.clip(drops.max(axis=0), 0.0, 1.0)
    return BaselineScores(
        name="occlusion",
        scores=scores,
        forward_passes=n + 1,
        p_full=p_full,
        region_values=drops,
    )


def rise(
    scorer: Scorer,
    image: np.ndarray,
    partition: RegionPartition,
    targets: Sequence[Target],
    *,
    n_masks: int,
    seed: int = 0,
    keep_probability: float = 0.5,
    fill: Fill | str = DEFAULT_FILL,
    batch_size: int = 16,
) -> BaselineScores:
    """RISE on the sample's regions with `n_masks` random masks (deterministic by `seed`):
    region value = E[p | region kept] - E[p | region removed]; score = 1 - the largest value
    relative to p_full, clipped to [0, 1] (n_masks + 1 passes)."""
    if n_masks < 2:
        raise ValueError(f"n_masks must be at least 2, got: {n_masks}")
    if not 0 < keep_probability < 1:
        raise ValueError(f"keep_probability must be in (0, 1), got: {keep_probability}")
    n = partition.n_regions
    rng = np.random.default_rng(seed)
    masks = rng.random((n_masks, n)) < keep_probability
    p_full, probs = _full_and(scorer, image, partition, masks, targets, fill, batch_size)
    kept = masks.astype(np.float64)
    n_kept = kept.sum(axis=0)[:, None]
    n_removed = n_masks - n_kept
    mean_kept = (kept.T @ probs) / np.maximum(n_kept, 1.0)
    mean_removed = ((1.0 - kept).T @ probs) / np.maximum(n_removed, 1.0)
    # a region never kept (or never removed) in this draw has no estimate: value 0
    values = np.where((n_kept > 0) & (n_removed > 0), mean_kept - mean_removed, 0.0)
    scores = 1.0 - np.clip(values.max(axis=0) / np.maximum(p_full, _EPS), 0.0, 1.0)
    return BaselineScores(
        name="rise",
        scores=scores,
        forward_passes=n_masks + 1,
        p_full=p_full,
        region_values=values,
    )


def order_from_values(values: np.ndarray) -> np.ndarray:
    """`(R,)` region ids by decreasing value (ties by region id): an ordering for the
    insertion, deletion and correction curves.  `values` is `(R,)`."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be (R,), got shape {values.shape}")
    return np.lexsort((np.arange(values.size), -values))
