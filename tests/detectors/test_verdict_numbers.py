"""The verdict rules on attributions written by hand: every threshold at its boundary, every
number a verdict carries, every sentence it gives, and the borrowing rule's arithmetic.

The searches in the other detector tests produce attributions whose numbers fall well inside
one rule; here the numbers are chosen (exact binary fractions) so that `>=` versus `>`, a term
dropped from a formula, or a wrong column fails a test.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from detectors import (
    Attribution,
    CrossEvidence,
    PriorThresholds,
    StopReason,
    Target,
    VerdictLabel,
    judge,
    judge_sample,
)
from detectors.language_prior import hallucination_score, perceptual_influence
from detectors.regions import RegionPartition
from detectors.types import Fill
from detectors.version import __version__

# three regions in a row: region 0 is half the image, regions 1 and 2 a quarter each
PARTITION = RegionPartition(labels=np.array([[0, 0, 1, 2]], dtype=np.int32))
KNIFE = Target(position=0, token_id=1, text="knife")
FORK = Target(position=3, token_id=2, text="fork")


def _attribution(
    *,
    p_full: float | list[float],
    p_blank: float | list[float],
    insight: float | list[float] = 0.5,
    removed: float | list[float] = 0.0,
    compact_set: tuple[int, ...] = (0,),
    stopped_by: StopReason = StopReason.CONVERGED,
    targets: tuple[Target, ...] = (KNIFE,),
) -> Attribution:
    """Three regions, order [0, 1, 2]; the curves pass through the given numbers at row k."""
    t = len(targets)

    def col(x: float | list[float]) -> np.ndarray:
        return np.broadcast_to(np.asarray(x, dtype=float), (t,))

    full, blank, ins, rem = col(p_full), col(p_blank), col(insight), col(removed)
    k = len(compact_set)
    insertion = np.tile(full, (4, 1))
    insertion[0], insertion[k] = blank, ins
    deletion = np.tile(blank, (4, 1))
    deletion[0], deletion[k] = full, rem
    return Attribution(
        targets=targets,
        partition=PARTITION,
        order=np.array([*compact_set, *(r for r in range(3) if r not in compact_set)]),
        insertion=insertion,
        deletion=deletion,
        p_full=full.copy(),
        p_blank=blank.copy(),
        compact_set=compact_set,
        forward_passes=12,
        seconds=0.5,
        stopped_by=stopped_by,
        search="eagle-exact",
        scorer_name="hand",
        fill=Fill.BLACK,
    )


def _one(attribution: Attribution, thresholds: PriorThresholds | None = None):  # type: ignore[no-untyped-def]
    (verdict,) = judge(attribution, thresholds)
    return verdict


# the thresholds


def test_the_documented_default_thresholds() -> None:
    th = PriorThresholds()
    assert (th.coverage, th.min_prior_ratio, th.max_prior_drop) == (0.9, 0.5, 0.5)
    assert (th.min_p_full, th.min_borrowed) == (0.01, 0.5)


@pytest.mark.parametrize(
    "name", ["coverage", "min_prior_ratio", "max_prior_drop", "min_p_full", "min_borrowed"]
)
def test_each_threshold_is_a_number_in_the_unit_interval(name: str) -> None:
    for ok in (0.0, 1.0, 0, 1):
        assert getattr(PriorThresholds(**{name: ok}), name) == ok
    for bad in (-0.001, 1.001):
        with pytest.raises(ValueError, match=f"^{name} must be a number in \\[0, 1\\], got: "):
            PriorThresholds(**{name: bad})
    with pytest.raises(ValueError, match=f"^{name} must be a number in \\[0, 1\\], got: '0.5'$"):
        PriorThresholds(**{name: "0.5"})


# one verdict: each rule at its boundary, with every number it carries


def test_language_prior_at_exactly_both_thresholds() -> None:
    # the text alone gives half, removing the compact set takes half
    a = _attribution(p_full=0.5, p_blank=0.25, insight=0.4, removed=0.25)
    v = _one(a)
    assert v.label is VerdictLabel.LANGUAGE_PRIOR
    assert v.reason == (
        "the text alone gives 50% of its probability and removing its 1 most important "
        "regions lowers it by only 50%"
    )
    assert (v.target, v.p_full, v.p_blank, v.insight) == (KNIFE, 0.5, 0.25, 0.4)
    assert (v.necessity, v.relative_drop, v.prior_score) == (0.75, 0.5, 0.5)
    assert v.hallucination_score == 0.75  # 1 - (1 - 0.5) * 0.5
    assert v.compact_set == (0,) and v.borrowed_from is None
    assert (v.detector, v.version) == ("eagle-language-prior", __version__)
    assert v.extra == {"prior_ratio": 0.5, "forward_passes": 12.0}
    # just below the prior ratio, or just above the drop: judged on the evidence
    assert _one(_attribution(p_full=0.5, p_blank=0.2495, removed=0.25)).label is (
        VerdictLabel.GROUNDED
    )
    assert _one(_attribution(p_full=0.5, p_blank=0.25, removed=0.2495)).label is (
        VerdictLabel.GROUNDED
    )


def test_grounded_says_how_much_removing_the_set_takes() -> None:
    v = _one(_attribution(p_full=0.5, p_blank=0.0625, insight=0.5, removed=0.0625))
    assert v.label is VerdictLabel.GROUNDED
    assert v.reason == (
        "removing its 1 most important regions lowers its probability by 88%; "
        "the text alone gives 12%"
    )
    assert (v.relative_drop, v.necessity) == (0.875, 0.9375)
    assert v.prior_score == math.sqrt(0.125 * 0.125)
    assert v.hallucination_score == pytest.approx(1 - (1 - 0.125) * 0.5)


def test_the_floor_on_p_full_is_inclusive() -> None:
    th = PriorThresholds(min_p_full=0.25)
    below = _one(_attribution(p_full=0.24, p_blank=0.0, removed=0.0), th)
    assert below.label is VerdictLabel.UNDETERMINED
    assert below.reason == "the model barely predicts the token (p_full 0.240 < 0.25)"
    at = _one(_attribution(p_full=0.25, p_blank=0.0, removed=0.0), th)
    assert at.label is VerdictLabel.GROUNDED
    # the default floor: 1%
    assert _one(_attribution(p_full=0.0099, p_blank=0.0)).label is VerdictLabel.UNDETERMINED
    assert _one(_attribution(p_full=0.01, p_blank=0.0)).label is VerdictLabel.GROUNDED


def test_a_token_with_zero_probability_has_no_ratios() -> None:
    th = PriorThresholds(min_p_full=0.0)
    v = _one(_attribution(p_full=0.0, p_blank=0.0, insight=0.0, removed=0.0), th)
    assert (v.relative_drop, v.extra["prior_ratio"], v.prior_score) == (0.0, 0.0, 0.0)
    assert v.hallucination_score == 1.0  # the model's doubt is total
    assert v.label is VerdictLabel.GROUNDED  # nothing to judge: no rule fires


def test_ratios_are_clipped_to_the_unit_interval() -> None:
    # the blank image scores higher than the original, and removing the set raises it
    v = _one(_attribution(p_full=0.5, p_blank=0.75, removed=0.625))
    assert (v.extra["prior_ratio"], v.relative_drop, v.prior_score) == (1.0, 0.0, 1.0)
    assert v.label is VerdictLabel.LANGUAGE_PRIOR and v.hallucination_score == 1.0


@pytest.mark.parametrize("stop", [StopReason.FORWARD_BUDGET, StopReason.TIME_BUDGET])
def test_out_of_budget_is_undetermined_only_while_unexplained(stop: StopReason) -> None:
    short = _one(_attribution(p_full=0.5, p_blank=0.0, insight=0.4375, stopped_by=stop))
    assert short.label is VerdictLabel.UNDETERMINED
    assert short.reason == (
        f"the search ran out of budget ({stop.value}) before a compact set explained the "
        "token (insight 0.438 < 0.9 * 0.500)"
    )
    # coverage * p_full exactly (0.5 * 0.5): explained
    th = PriorThresholds(coverage=0.5)
    enough = _one(_attribution(p_full=0.5, p_blank=0.0, insight=0.25, stopped_by=stop), th)
    assert enough.label is VerdictLabel.GROUNDED


@pytest.mark.parametrize(
    "stop", [StopReason.CONVERGED, StopReason.COMPLETE, StopReason.MAX_REGIONS]
)
def test_a_search_that_was_not_cut_short_is_judged_on_its_evidence(stop: StopReason) -> None:
    v = _one(_attribution(p_full=0.5, p_blank=0.0, insight=0.0625, stopped_by=stop))
    assert v.label is VerdictLabel.GROUNDED


def test_each_target_is_judged_on_its_own_column() -> None:
    a = _attribution(
        p_full=[0.5, 0.25],
        p_blank=[0.0, 0.25],
        insight=[0.5, 0.25],
        removed=[0.0, 0.25],
        compact_set=(0, 1),
        targets=(KNIFE, FORK),
    )
    knife, fork = judge(a)
    assert (knife.target, knife.label, knife.p_full, knife.relative_drop) == (
        KNIFE,
        VerdictLabel.GROUNDED,
        0.5,
        1.0,
    )
    assert (fork.target, fork.label, fork.p_blank, fork.relative_drop) == (
        FORK,
        VerdictLabel.LANGUAGE_PRIOR,
        0.25,
        0.0,
    )
    assert knife.compact_set == fork.compact_set == (0, 1)
    assert fork.perceptual_influence == perceptual_influence(a, 1)


def test_perceptual_influence_skips_unscored_prefixes_and_weighs_by_area() -> None:
    a = _attribution(p_full=[0.875, 0.5], p_blank=[0.125, 0.5], targets=(KNIFE, FORK))
    insertion = np.array([[0.125, 0.5], [np.nan, 0.5], [0.625, 0.5], [0.875, 0.5]])
    a = dataclasses.replace(a, insertion=insertion, order=np.array([1, 0, 2]))
    # area fractions in order [1, 0, 2]: 0.25, 0.5, 0.25 -> x = 0, 0.25, 0.75, 1.0
    # row 1 (x = 0.25) unscored: trapezoids over x = 0, 0.75, 1 of y - 0.125 = 0, 0.5, 0.75
    assert perceptual_influence(a) == 0.75 * 0.5 / 2 + 0.25 * (0.5 + 0.75) / 2
    assert perceptual_influence(a, 1) == 0.0  # a flat curve
    assert judge(a)[0].perceptual_influence == perceptual_influence(a)


def test_the_hallucination_score_stays_in_the_unit_interval() -> None:
    assert hallucination_score(0.5, 0.0, 1.5) == 0.5  # p_full above 1 counts as 1
    assert hallucination_score(0.0, 0.0, -0.5) == 1.0
    assert hallucination_score(-1.0, -1.0, 1.0) == 0.0


# borrowed evidence


def _grounded(target: Target, p_full: float, compact_set: tuple[int, ...]) -> Attribution:
    return _attribution(
        p_full=p_full, p_blank=0.0, insight=p_full, compact_set=compact_set, targets=(target,)
    )


def test_without_cross_probes_the_share_of_the_set_inside_the_donors_decides() -> None:
    knife, fork = judge_sample([_grounded(KNIFE, 0.75, (0, 1)), _grounded(FORK, 0.5, (0, 2))])
    # half of the fork's set lies in the knife's (the threshold, inclusive); the knife is named
    # more confidently, so it keeps its evidence although half its set lies in the fork's
    assert knife.label is VerdictLabel.GROUNDED and knife.extra["borrowing_score"] == 0.0
    assert knife.borrowed_from is None
    assert fork.label is VerdictLabel.BORROWED_EVIDENCE and fork.borrowed_from == 0
    assert fork.extra["borrowing_score"] == 0.5
    assert fork.reason == (
        "its probability rests on the regions of 'knife' (position 0), another object of the "
        "same output (borrowing score 0.50)"
    )
    assert fork.hallucination_score == 1 - 0.5 * 0.5  # prior 0, borrowing 0.5, p_full 0.5
    assert fork.extra["prior_ratio"] == 0.0 and fork.p_full == 0.5
    # a stricter threshold keeps it grounded, with the same score
    (_, strict) = judge_sample(
        [_grounded(KNIFE, 0.75, (0, 1)), _grounded(FORK, 0.5, (0, 2))],
        PriorThresholds(min_borrowed=0.51),
    )
    assert strict.label is VerdictLabel.GROUNDED and strict.extra["borrowing_score"] == 0.5
    assert strict.hallucination_score == 0.75


def test_of_two_equally_confident_words_the_later_one_borrows() -> None:
    first, second = judge_sample([_grounded(KNIFE, 0.5, (0,)), _grounded(FORK, 0.5, (0,))])
    assert first.label is VerdictLabel.GROUNDED and first.extra["borrowing_score"] == 0.0
    assert second.label is VerdictLabel.BORROWED_EVIDENCE and second.borrowed_from == 0
    # the earlier word borrows when it is the less confident one
    first, second = judge_sample([_grounded(KNIFE, 0.25, (0,)), _grounded(FORK, 0.5, (0,))])
    assert first.label is VerdictLabel.BORROWED_EVIDENCE and first.borrowed_from == 3
    assert second.label is VerdictLabel.GROUNDED


def test_only_a_grounded_word_lends_and_only_a_grounded_word_is_relabelled() -> None:
    prior = _attribution(p_full=0.5, p_blank=0.25, removed=0.25, targets=(KNIFE,))
    knife, fork = judge_sample([prior, _grounded(FORK, 0.5, (0,))])
    assert knife.label is VerdictLabel.LANGUAGE_PRIOR  # the fork (grounded) lends to it...
    assert knife.extra["borrowing_score"] == 1.0  # ...which raises its score, not its label
    assert knife.prior_score == 0.5 and knife.hallucination_score == 1.0  # 0.75 on its own
    assert fork.label is VerdictLabel.GROUNDED  # the knife cannot lend: no score at all
    assert fork.extra["borrowing_score"] == 0.0 and fork.borrowed_from is None


def test_a_single_word_borrows_from_nobody() -> None:
    (only,) = judge_sample([_grounded(KNIFE, 0.5, (0,))])
    assert only.label is VerdictLabel.GROUNDED and only.extra["borrowing_score"] == 0.0
    assert only.hallucination_score == 0.5


def _cross(without: list[list[float]], own_only: list[list[float]]) -> CrossEvidence:
    return CrossEvidence(
        without_other=np.array(without), own_only_removed=np.array(own_only), forward_passes=2
    )


def test_with_cross_probes_the_score_multiplies_three_drops() -> None:
    words = [_grounded(KNIFE, 0.8, (0,)), _grounded(FORK, 0.5, (1,))]
    # fork without the knife's set: 0.1 (drop 0.8); knife without the fork's: 0.2 (drop 0.75);
    # fork with only its own evidence outside the knife's set removed: 0.5 (drop 0)
    cross = _cross([[np.nan, 0.2], [0.1, np.nan]], [[np.nan, 0.8], [0.5, np.nan]])
    knife, fork = judge_sample(words, cross=cross)
    assert fork.extra["borrowing_score"] == pytest.approx(0.8 * 0.75, abs=1e-12)
    assert fork.label is VerdictLabel.BORROWED_EVIDENCE and fork.borrowed_from == 0
    assert fork.reason.endswith("(borrowing score 0.60)")
    assert knife.label is VerdictLabel.GROUNDED and knife.extra["borrowing_score"] == 0.0
    # the fork's own evidence matters: removing it takes a quarter, the score shrinks
    cross = _cross([[np.nan, 0.2], [0.1, np.nan]], [[np.nan, 0.8], [0.375, np.nan]])
    _, fork = judge_sample(words, cross=cross)
    assert fork.extra["borrowing_score"] == pytest.approx(0.8 * 0.75 * 0.75, abs=1e-12)
    assert fork.label is VerdictLabel.GROUNDED


def test_cross_drops_are_clipped() -> None:
    words = [_grounded(KNIFE, 0.5, (0,)), _grounded(FORK, 0.5, (1,))]
    # probabilities that rise when regions are removed: every drop is 0, not negative
    cross = _cross([[np.nan, 0.75], [0.75, np.nan]], [[np.nan, 0.75], [0.75, np.nan]])
    knife, fork = judge_sample(words, cross=cross)
    assert knife.extra["borrowing_score"] == fork.extra["borrowing_score"] == 0.0
    # probabilities below zero: each drop is 1, not more
    cross = _cross([[np.nan, -0.5], [-0.5, np.nan]], [[np.nan, 0.5], [0.5, np.nan]])
    _, fork = judge_sample(words, cross=cross)
    assert fork.extra["borrowing_score"] == 1.0


def test_a_word_with_zero_probability_neither_lends_nor_borrows() -> None:
    th = PriorThresholds(min_p_full=0.0)
    words = [_grounded(KNIFE, 0.0, (0,)), _grounded(FORK, 0.5, (0,))]
    cross = _cross([[np.nan, 0.0], [0.0, np.nan]], [[np.nan, 0.0], [0.0, np.nan]])
    knife, fork = judge_sample(words, th, cross)
    assert knife.label is fork.label is VerdictLabel.GROUNDED
    assert knife.extra["borrowing_score"] == fork.extra["borrowing_score"] == 0.0


# three words: the loops over pairs must look past a pair they skip

SPOON = Target(position=5, token_id=3, text="spoon")


def test_a_word_borrows_from_a_later_donor_after_an_unrelated_one() -> None:
    # the fork shares nothing with the knife and all of its set with the spoon
    words = [
        _grounded(KNIFE, 0.75, (0,)),
        _grounded(SPOON, 0.75, (1,)),
        _grounded(FORK, 0.5, (1,)),
    ]
    knife, spoon, fork = judge_sample(words)
    assert fork.label is VerdictLabel.BORROWED_EVIDENCE and fork.borrowed_from == 5
    assert knife.label is spoon.label is VerdictLabel.GROUNDED


def test_mutual_borrowing_is_settled_for_every_pair_past_a_skipped_one() -> None:
    # the spoon is prior-driven (it lends nothing); the knife and the fork share their region,
    # and the fork is named more confidently: the knife borrows, the fork keeps its evidence
    spoon = _attribution(p_full=0.5, p_blank=0.25, removed=0.25, targets=(SPOON,))
    words = [_grounded(KNIFE, 0.5, (0,)), spoon, _grounded(FORK, 0.75, (0,))]
    knife, spoon_v, fork = judge_sample(words)
    assert knife.label is VerdictLabel.BORROWED_EVIDENCE and knife.borrowed_from == 3
    assert fork.label is VerdictLabel.GROUNDED and fork.extra["borrowing_score"] == 0.0
    assert spoon_v.label is VerdictLabel.LANGUAGE_PRIOR


def test_cross_probes_look_past_a_word_with_zero_probability() -> None:
    th = PriorThresholds(min_p_full=0.0)
    words = [
        _grounded(SPOON, 0.0, (2,)),
        _grounded(KNIFE, 0.8, (0,)),
        _grounded(FORK, 0.5, (1,)),
    ]
    nan = np.nan
    cross = _cross(
        [[nan, 0.0, 0.0], [0.0, nan, 0.2], [0.0, 0.1, nan]],
        [[nan, 0.0, 0.0], [0.0, nan, 0.8], [0.0, 0.5, nan]],
    )
    spoon, knife, fork = judge_sample(words, th, cross)
    assert fork.label is VerdictLabel.BORROWED_EVIDENCE and fork.borrowed_from == 0
    assert fork.extra["borrowing_score"] == pytest.approx(0.6, abs=1e-12)
    assert spoon.extra["borrowing_score"] == knife.extra["borrowing_score"] == 0.0
