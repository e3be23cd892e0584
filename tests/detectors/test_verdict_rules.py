"""The verdict's rules one at a time, on tokens whose response to each region is known exactly.

Each test pins one term of the rules (the model's own doubt in the score, the floor below which
no verdict is possible, evidence that only a set of regions removes), so that removing that term
fails a test here.
"""

from __future__ import annotations

import numpy as np
import pytest

from detectors import (
    EagleSearch,
    PriorThresholds,
    SearchBudget,
    StopReason,
    Target,
    VerdictLabel,
    grid_partition,
    judge,
)
from detectors.language_prior import hallucination_score
from detectors.scorers import AnalyticScorer
from detectors.scorers.analytic import TokenResponse

TARGET = Target(position=0, token_id=0, text="cat")
IMAGE = np.zeros((64, 64, 3), dtype=np.uint8)


def _scorer(
    bias: float, weights: dict[int, float], pairs: tuple[tuple[int, int, float], ...] = ()
) -> AnalyticScorer:
    w = np.random.default_rng(0).normal(0.0, 0.05, 64)
    for region, value in weights.items():
        w[region] = value
    return AnalyticScorer({0: TokenResponse(bias=bias, weights=w, interactions=pairs)})


@pytest.mark.parametrize(
    ("prior", "borrowing", "p_full", "expected"),
    [
        (0.0, 0.0, 1.0, 0.0),  # grounded and certain: nothing suspect
        (0.0, 0.0, 0.4, 0.6),  # the model's own doubt counts on its own
        (0.5, 0.0, 1.0, 0.5),
        (0.0, 0.5, 1.0, 0.5),
        (0.5, 0.5, 0.5, 0.875),  # a noisy-or: 1 - 0.5 * 0.5 * 0.5
        (1.0, 0.0, 0.9, 1.0),
    ],
)
def test_the_score_is_a_noisy_or_of_prior_borrowing_and_doubt(
    prior: float, borrowing: float, p_full: float, expected: float
) -> None:
    assert hallucination_score(prior, borrowing, p_full) == pytest.approx(expected)


def test_a_token_the_model_barely_predicts_gets_no_verdict() -> None:
    # real evidence in region 5, but the model gives the token 0.3% even with it visible
    scorer = _scorer(-9.0, {5: 3.2})
    partition = grid_partition(IMAGE, 8, 8)
    attribution = EagleSearch(scorer, SearchBudget.exhaustive()).attribute(
        IMAGE, partition, [TARGET]
    )
    assert attribution.p_full[0] < 0.01
    (verdict,) = judge(attribution)
    assert verdict.label is VerdictLabel.UNDETERMINED and "barely predicts" in verdict.reason
    # the same numbers above a lower floor are judged on their evidence
    (verdict,) = judge(attribution, PriorThresholds(min_p_full=0.001))
    assert verdict.label is VerdictLabel.GROUNDED
    assert verdict.hallucination_score == pytest.approx(1.0 - attribution.p_full[0], abs=0.05)


def test_redundant_evidence_is_found_on_the_deletion_side() -> None:
    # the token is seen in region 3 or region 7, either one suffices: inserting 3 explains it,
    # but removing 3 alone takes nothing (7 still shows it), so the compact set must hold both
    # for the token to be necessary on them.
    scorer = _scorer(-4.0, {3: 6.0, 7: 6.0}, ((3, 7, -6.0),))
    partition = grid_partition(IMAGE, 8, 8)
    budget = SearchBudget.fraction_of_exact(64, 0.10)
    attribution = EagleSearch(scorer, budget).attribute(IMAGE, partition, [TARGET])
    assert {3, 7} <= set(attribution.compact_set) and len(attribution.compact_set) <= 3
    assert attribution.stopped_by is StopReason.CONVERGED
    k = len(attribution.compact_set)
    assert 1.0 - attribution.deletion[k, 0] > 0.9  # necessity: removing both kills the token
