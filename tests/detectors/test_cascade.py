"""The cheap-first cascade on the analytic scorer: which words it searches, and their scores."""

from __future__ import annotations

import numpy as np
import pytest

from detectors import SearchBudget, Target, explain, grid_partition
from detectors.cascade import CascadeThresholds, cascade
from detectors.scorers import AnalyticScorer, TokenResponse

IMAGE = np.zeros((32, 32, 3), dtype=np.uint8)
PARTITION = grid_partition(IMAGE, 4, 4)
BUDGET = SearchBudget(max_forward_passes=150)
KNIFE_T = Target(position=0, token_id=1, text="knife")
FORK_T = Target(position=1, token_id=2, text="fork")
SPOON_T = Target(position=2, token_id=3, text="spoon")
BIRD_T = Target(position=3, token_id=4, text="bird")


def _scorer() -> AnalyticScorer:
    knife = np.zeros(16)
    knife[[1, 2]] = 4.0
    fork = np.zeros(16)
    fork[[1, 2]] = 3.0  # the absent fork rests on the knife's pixels
    spoon = np.zeros(16)
    spoon[5] = 0.3  # the text alone predicts it
    bird = np.zeros(16)
    bird[12] = 1.0  # barely named
    return AnalyticScorer(
        {
            1: TokenResponse(bias=-4.0, weights=knife),
            2: TokenResponse(bias=-4.0, weights=fork),
            3: TokenResponse(bias=2.0, weights=spoon),
            4: TokenResponse(bias=-4.0, weights=bird),
        }
    )


def test_clear_words_are_decided_cheaply_and_the_borrower_is_still_caught() -> None:
    scorer = _scorer()
    targets = [KNIFE_T, FORK_T, SPOON_T, BIRD_T]
    out = cascade(IMAGE, scorer, targets, partition=PARTITION, budget=BUDGET)
    assert out.stages == ("search", "search", "text_driven", "doubtful")
    assert out.searched == (0, 1)
    assert out.explanation is not None
    assert out.forward_passes == 2 + out.explanation.forward_passes
    knife, fork, spoon, bird = out.scores
    assert knife < 0.3 and fork > 0.8  # confident and image-dependent, yet borrowed
    assert spoon > 0.9 and bird > 0.9
    # the searched words get exactly the scores the full search gives them on their own
    full = explain(IMAGE, scorer, [KNIFE_T, FORK_T], budget=BUDGET, partition=PARTITION)
    np.testing.assert_allclose(out.scores[:2], [v.hallucination_score for v in full.verdicts])
    # stage 1's numbers are the model's
    np.testing.assert_allclose(out.p_full[2], 1 / (1 + np.exp(-2.3)))
    np.testing.assert_allclose(out.p_blank[2], 1 / (1 + np.exp(-2.0)))


def test_a_lone_confident_word_has_no_donor_to_test() -> None:
    scorer = _scorer()
    out = cascade(IMAGE, scorer, [KNIFE_T, SPOON_T], partition=PARTITION, budget=BUDGET)
    assert out.stages == ("alone", "text_driven")
    assert out.explanation is None and out.forward_passes == 2
    p_full, p_blank = 1 / (1 + np.exp(-4.0)), 1 / (1 + np.exp(4.0))
    expected = 1 - (1 - np.sqrt(p_blank / p_full)) * p_full  # no drop known: taken as none
    assert out.scores[0] == pytest.approx(expected)
    searched = cascade(
        IMAGE,
        scorer,
        [KNIFE_T, SPOON_T],
        partition=PARTITION,
        budget=BUDGET,
        cheap=CascadeThresholds(search_alone=True),
    )
    assert searched.stages == ("search", "text_driven") and searched.searched == (0,)
    assert searched.forward_passes > 2


def test_cascade_validates_its_input() -> None:
    with pytest.raises(ValueError, match="min_p_full"):
        CascadeThresholds(min_p_full=1.5)
    with pytest.raises(ValueError, match="at least one target"):
        cascade(IMAGE, _scorer(), [], partition=PARTITION, budget=BUDGET)
