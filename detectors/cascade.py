"""A cheap-first cascade: two passes decide the clear cases, the search runs where they cannot.

Stage 1 scores every object word of a sample on the original and on the blank image (2 forward
passes for all words together) and decides two kinds of word without a search:

- **doubtful**: the model barely names it (p_full < `min_p_full`);
- **text-driven**: the text alone gives most of its probability (p_blank / p_full >=
  `min_prior_ratio`), the mark of a language-prior hallucination.

Every other word is confident and image-dependent, which is how a real object looks, and also
how a co-occurrence hallucination looks (its probability rests on another object's pixels).
Those words go to stage 2: the budgeted EAGLE search and the cross-word borrowing test
(`explain`).  The borrowing test needs a second confident, image-dependent word of the same
output to lend the evidence; a sample with only one such word has no donor word to test, so
that word is decided from stage 1 too (`search_alone=False`, the default; the search adds
nothing the score uses there except the drop of its compact set).

Scores share one scale: a stage-1 word gets `hallucination_score(sqrt(p_blank / p_full), 0,
p_full)` (its compact set's drop unknown, taken as none), a searched word its verdict's
`hallucination_score`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from detectors.baselines import image_free_contrast
from detectors.budget import SearchBudget
from detectors.explanation import Explanation, explain
from detectors.language_prior import PriorThresholds, hallucination_score
from detectors.regions import RegionPartition
from detectors.scorers.protocol import Scorer
from detectors.types import DEFAULT_FILL, Fill, Target

__all__ = ["STAGES", "CascadeResult", "CascadeThresholds", "cascade"]

STAGES: tuple[str, ...] = ("doubtful", "text_driven", "alone", "search")


@dataclass(frozen=True, kw_only=True, slots=True)
class CascadeThresholds:
    """Where stage 1 decides on its own.

    Attributes:
        min_p_full: below this p_full a word is decided as doubtful.
        min_prior_ratio: at or above this p_blank / p_full a word is decided as text-driven.
        search_alone: search a confident, image-dependent word even when it is the only one of
            its sample (no donor word for the borrowing test).
    """

    min_p_full: float = 0.5
    min_prior_ratio: float = 0.5
    search_alone: bool = False

    def __post_init__(self) -> None:
        for name in ("min_p_full", "min_prior_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], got: {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class CascadeResult:
    """What the cascade concluded about the object words of one sample (T of them).

    Attributes:
        scores: `(T,)` hallucination score per word.
        stages: per word, where it was decided: `doubtful`, `text_driven`, `alone` (stage 1)
            or `search` (stage 2).
        p_full, p_blank: `(T,)` the stage-1 probabilities.
        explanation: the search's explanation of the searched words (in their order), or None.
        searched: indices of the searched words.
        forward_passes: stage 1's passes plus the search's.
    """

    scores: np.ndarray
    stages: tuple[str, ...]
    p_full: np.ndarray
    p_blank: np.ndarray
    explanation: Explanation | None
    searched: tuple[int, ...]
    forward_passes: int


def cascade(
    image: np.ndarray,
    scorer: Scorer,
    targets: Sequence[Target],
    *,
    partition: RegionPartition,
    budget: SearchBudget,
    fill: Fill | str = DEFAULT_FILL,
    thresholds: PriorThresholds | None = None,
    cheap: CascadeThresholds | None = None,
) -> CascadeResult:
    """Score `targets` (the object words of one output) cheaply, and search only the words
    stage 1 cannot decide (see the module's docstring)."""
    if not targets:
        raise ValueError("the cascade needs at least one target")
    cheap = cheap or CascadeThresholds()
    contrast = image_free_contrast(scorer, image, partition, targets, fill=fill)
    p_full = contrast.p_full
    ratio = np.clip(contrast.scores, 0.0, 1.0)
    p_blank = contrast.scores * p_full
    stages = []
    for p, r in zip(p_full, ratio, strict=True):
        if p < cheap.min_p_full:
            stages.append("doubtful")
        elif r >= cheap.min_prior_ratio:
            stages.append("text_driven")
        else:
            stages.append("search")
    candidates = [i for i, s in enumerate(stages) if s == "search"]
    if len(candidates) == 1 and not cheap.search_alone:
        stages[candidates[0]] = "alone"
        candidates = []
    scores = np.array(
        [
            hallucination_score(math.sqrt(float(r)), 0.0, float(p))
            for p, r in zip(p_full, ratio, strict=True)
        ]
    )
    explanation = None
    passes = contrast.forward_passes
    if candidates:
        explanation = explain(
            image,
            scorer,
            [targets[i] for i in candidates],
            budget=budget,
            partition=partition,
            fill=fill,
            thresholds=thresholds,
        )
        passes += explanation.forward_passes
        for i, verdict in zip(candidates, explanation.verdicts, strict=True):
            scores[i] = verdict.hallucination_score
    return CascadeResult(
        scores=scores,
        stages=tuple(stages),
        p_full=p_full,
        p_blank=p_blank,
        explanation=explanation,
        searched=tuple(candidates),
        forward_passes=passes,
    )
