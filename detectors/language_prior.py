"""Language prior versus perception: from attributions to verdicts (EAGLE.md section 7).

A token is **language-prior-driven** when the text alone already predicts it (p_blank is a large
share of p_full) and removing its compact set of regions barely lowers it.  It is **grounded**
when removing a compact set makes it collapse.  It has **borrowed evidence** when its compact set
is (mostly) the compact set of another object word of the same output that is itself grounded:
the evidence belongs to a different object.  It is **undetermined** when the search ran out of
budget before its compact set explained the token, or when the model barely predicts it at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from detectors.types import (
    Attribution,
    CrossEvidence,
    StopReason,
    Target,
    Verdict,
    VerdictLabel,
)
from detectors.version import __version__

__all__ = [
    "DETECTOR_NAME",
    "PriorThresholds",
    "hallucination_score",
    "judge",
    "judge_sample",
    "perceptual_influence",
]

DETECTOR_NAME = "eagle-language-prior"


@dataclass(frozen=True, kw_only=True, slots=True)
class PriorThresholds:
    """The numbers a verdict is decided with.  Defaults are a starting point; calibrate them per
    model on data with ground truth.

    Attributes:
        coverage: the compact set explains the token when its insight reaches `coverage` * p_full.
        min_prior_ratio: p_blank / p_full at or above which the text alone predicts the token.
        max_prior_drop: relative drop (p_full - p(compact set removed)) / p_full at or below
            which no region is necessary.
        min_p_full: below this the model barely predicts the token; no verdict is possible.
        min_borrowed: borrowing score (see `judge_sample`) at or above which a token's evidence
            counts as borrowed from another object word.
    """

    coverage: float = 0.9
    min_prior_ratio: float = 0.5
    max_prior_drop: float = 0.5
    min_p_full: float = 0.01
    min_borrowed: float = 0.5

    def __post_init__(self) -> None:
        for name in ("coverage", "min_prior_ratio", "max_prior_drop", "min_p_full", "min_borrowed"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], got: {value!r}")


def perceptual_influence(attribution: Attribution, column: int = 0) -> float:
    """Area-normalised perceptual influence of one target: the trapezoid area under the
    insertion curve over the cumulative area fraction, minus the curve's minimum (unscored
    prefixes are interpolated)."""
    fractions = np.concatenate(
        [[0.0], np.cumsum(attribution.partition.area_fractions[attribution.order])]
    )
    curve = attribution.insertion[:, column]
    known = ~np.isnan(curve)
    x, y = fractions[known], curve[known]
    return float(np.trapezoid(y - y.min(), x))


def judge(attribution: Attribution, thresholds: PriorThresholds | None = None) -> list[Verdict]:
    """One verdict per target of `attribution` (grounded / language_prior / undetermined)."""
    thresholds = thresholds or PriorThresholds()
    return [_judge_one(attribution, col, thresholds) for col in range(len(attribution.targets))]


def judge_sample(
    attributions: Sequence[Attribution],
    thresholds: PriorThresholds | None = None,
    cross: CrossEvidence | None = None,
) -> list[Verdict]:
    """Verdicts for the object words of one output, one single-target attribution each (as made
    by `EagleSearch.attribute_each` / `attribute_sample`), with borrowed evidence detected
    across them.

    Word i borrows the evidence of another grounded word j when its probability collapses
    once j's evidence is removed, but not when only its own evidence outside j's is removed,
    and j in turn needs i's compact set S_i: score = drop(i without E_j) * drop(j without S_i)
    * (1 - drop(i without S_i minus E_j)), from `cross`.  E_j is j's *object*
    (`CrossEvidence.donor_objects`: the shortest prefix of j's ordering whose removal collapses
    j) where the probes found one, else j's compact set S_j (minimal for j's insight, so its
    removal may leave enough of the object to still lend to i).  Without `cross`, the share of
    i's compact set inside j's stands in for it (free, coarser).
    """
    thresholds = thresholds or PriorThresholds()
    verdicts = [v for a in attributions for v in judge(a, thresholds)]
    scores = _borrowing(verdicts, cross)
    out: list[Verdict] = []
    for i, verdict in enumerate(verdicts):
        row = scores[i]
        donor = int(np.nanargmax(row)) if np.isfinite(row).any() else None
        borrowed = float(row[donor]) if donor is not None else 0.0
        score = hallucination_score(verdict.prior_score, borrowed, verdict.p_full)
        extra = {**verdict.extra, "borrowing_score": borrowed}
        if (
            verdict.label is not VerdictLabel.GROUNDED
            or donor is None
            or borrowed < thresholds.min_borrowed
        ):
            out.append(_replace(verdict, hallucination_score=score, extra=extra))
            continue
        other = verdicts[donor]
        out.append(
            _replace(
                verdict,
                label=VerdictLabel.BORROWED_EVIDENCE,
                reason=f"its probability rests on the regions of '{other.target.text}' "
                f"(position {other.target.position}), another object of the same output "
                f"(borrowing score {borrowed:.2f})",
                borrowed_from=other.target.position,
                hallucination_score=score,
                extra=extra,
            )
        )
    return out


def _borrowing(verdicts: Sequence[Verdict], cross: CrossEvidence | None) -> np.ndarray:
    """`(T, T)` borrowing scores [i, j] in [0, 1]; NaN where j cannot lend to i.

    Only a word judged grounded on its own can lend evidence, and only to a word the model
    names less confidently (lower p_full): when two words rest on the same regions each looks
    as if it borrowed from the other, and a real object is named more confidently than one
    inferred from its neighbour."""
    t = len(verdicts)
    out = np.full((t, t), np.nan)
    sets = [set(v.compact_set) for v in verdicts]
    for i, mine in enumerate(verdicts):
        for j, other in enumerate(verdicts):
            if j == i or other.label is not VerdictLabel.GROUNDED:
                continue
            if cross is None:
                out[i, j] = len(sets[i] & sets[j]) / max(1, len(sets[i]))
                continue
            p, q = mine.p_full, other.p_full
            if p <= 0 or q <= 0:
                continue
            without, own_only = cross.without_other[i, j], cross.own_only_removed[i, j]
            if _has_object(cross, j):
                assert cross.without_donor_object is not None
                assert cross.own_only_removed_object is not None
                without = cross.without_donor_object[i, j]
                own_only = cross.own_only_removed_object[i, j]
            cross_drop = _clip01((p - float(without)) / p)
            back_drop = _clip01((q - float(cross.without_other[j, i])) / q)
            own_drop = _clip01((p - float(own_only)) / p)
            out[i, j] = cross_drop * back_drop * (1.0 - own_drop)
    for i in range(t):
        for j in range(i + 1, t):
            if np.isnan(out[i, j]) or np.isnan(out[j, i]):
                continue
            # mutual: the less confident word borrows, the other keeps its evidence
            if verdicts[i].p_full >= verdicts[j].p_full:
                out[i, j] = 0.0
            else:
                out[j, i] = 0.0
    return out


def _has_object(cross: CrossEvidence, j: int) -> bool:
    """Whether the donor-object probes of word j were made and found its object."""
    return (
        cross.without_donor_object is not None
        and cross.own_only_removed_object is not None
        and j < len(cross.donor_objects)
        and len(cross.donor_objects[j]) > 0
    )


def _replace(verdict: Verdict, **changes: object) -> Verdict:
    fields = {name: getattr(verdict, name) for name in verdict.__dataclass_fields__}
    fields.update(changes)
    return Verdict(**fields)


def _judge_one(attribution: Attribution, col: int, th: PriorThresholds) -> Verdict:
    target: Target = attribution.targets[col]
    k = len(attribution.compact_set)
    p_full = float(attribution.p_full[col])
    p_blank = float(attribution.p_blank[col])
    insight = float(attribution.insertion[k, col])
    removed = float(attribution.deletion[k, col])
    necessity = 1.0 - removed
    relative_drop = _clip01((p_full - removed) / p_full) if p_full > 0 else 0.0
    prior_ratio = _clip01(p_blank / p_full) if p_full > 0 else 0.0
    prior_score = math.sqrt(prior_ratio * (1.0 - relative_drop))
    influence = perceptual_influence(attribution, col)
    budget_stop = attribution.stopped_by in (StopReason.FORWARD_BUDGET, StopReason.TIME_BUDGET)
    explained = insight >= th.coverage * p_full

    if p_full < th.min_p_full:
        label = VerdictLabel.UNDETERMINED
        reason = f"the model barely predicts the token (p_full {p_full:.3f} < {th.min_p_full})"
    elif prior_ratio >= th.min_prior_ratio and relative_drop <= th.max_prior_drop:
        label = VerdictLabel.LANGUAGE_PRIOR
        reason = (
            f"the text alone gives {prior_ratio:.0%} of its probability and removing its "
            f"{k} most important regions lowers it by only {relative_drop:.0%}"
        )
    elif budget_stop and not explained:
        label = VerdictLabel.UNDETERMINED
        reason = (
            f"the search ran out of budget ({attribution.stopped_by.value}) before a compact "
            f"set explained the token (insight {insight:.3f} < {th.coverage} * {p_full:.3f})"
        )
    else:
        label = VerdictLabel.GROUNDED
        reason = (
            f"removing its {k} most important regions lowers its probability by "
            f"{relative_drop:.0%}; the text alone gives {prior_ratio:.0%}"
        )
    return Verdict(
        target=target,
        label=label,
        prior_score=prior_score,
        hallucination_score=hallucination_score(prior_score, 0.0, p_full),
        p_full=p_full,
        p_blank=p_blank,
        insight=insight,
        necessity=necessity,
        relative_drop=relative_drop,
        perceptual_influence=influence,
        compact_set=attribution.compact_set,
        reason=reason,
        detector=DETECTOR_NAME,
        version=__version__,
        extra={"prior_ratio": prior_ratio, "forward_passes": float(attribution.forward_passes)},
    )


def hallucination_score(prior_score: float, borrowing: float, p_full: float) -> float:
    """How likely a mention is a hallucination, in [0, 1]: a noisy-or of three signals, each
    in [0, 1]: the language-prior score, the borrowed-evidence score, and the model's own doubt
    (1 - p_full; a mention the model makes with little confidence is suspect on its own)."""
    return _clip01(1.0 - (1.0 - prior_score) * (1.0 - borrowing) * _clip01(p_full))


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))
