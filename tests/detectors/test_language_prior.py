from __future__ import annotations

import numpy as np
import pytest

from detectors import (
    EagleSearch,
    PriorThresholds,
    SearchBudget,
    VerdictLabel,
    explain,
    grid_partition,
    judge,
)
from detectors.language_prior import perceptual_influence
from detectors.scorers import CASE_NAMES, analytic_case

IMAGE = np.zeros((64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize(
    "budget", [SearchBudget.exhaustive(), SearchBudget(max_forward_passes=416)]
)
def test_named_cases_get_their_expected_verdicts(name: str, budget: SearchBudget) -> None:
    case = analytic_case(name, 64, seed=1)
    result = explain(
        IMAGE, case.scorer, case.targets, budget=budget, partition=grid_partition(IMAGE, 8, 8)
    )
    assert [v.label for v in result.verdicts] == list(case.expected)
    for verdict, evidence in zip(result.verdicts, case.evidence, strict=True):
        assert verdict.detector == "eagle-language-prior" and verdict.version
        assert 0.0 <= verdict.prior_score <= 1.0
        if evidence:
            assert set(verdict.compact_set) == evidence
            assert verdict.necessity > 0.9 and verdict.prior_score < 0.2
        else:
            assert verdict.prior_score > 0.8 and verdict.relative_drop < 0.2


def test_borrowed_evidence_names_the_donor() -> None:
    case = analytic_case("borrowed_evidence", 16)
    result = explain(IMAGE, case.scorer, case.targets, partition=grid_partition(IMAGE, 4, 4))
    knife, fork = result.verdicts
    assert fork.label is VerdictLabel.BORROWED_EVIDENCE
    assert fork.borrowed_from == knife.target.position
    assert "knife" in fork.reason


def test_a_joint_search_cannot_see_borrowed_evidence() -> None:
    # one search for both words: a single compact set, so no second object to compare with
    case = analytic_case("borrowed_evidence", 16)
    result = explain(
        IMAGE, case.scorer, case.targets, partition=grid_partition(IMAGE, 4, 4), joint=True
    )
    assert len(result.attributions) == 1
    assert [v.label for v in result.verdicts] == [VerdictLabel.GROUNDED, VerdictLabel.GROUNDED]


def test_out_of_budget_before_explaining_is_undetermined() -> None:
    case = analytic_case("grounded", 64, seed=1)
    search = EagleSearch(case.scorer, SearchBudget(max_forward_passes=40))
    attribution = search.attribute(IMAGE, grid_partition(IMAGE, 8, 8), case.targets)
    (verdict,) = judge(attribution)
    assert verdict.label is VerdictLabel.UNDETERMINED
    assert "budget" in verdict.reason


def test_verdict_numbers_come_from_the_attribution() -> None:
    case = analytic_case("grounded", 16)
    attribution = EagleSearch(case.scorer).attribute(
        IMAGE, grid_partition(IMAGE, 4, 4), case.targets
    )
    (verdict,) = judge(attribution)
    k = len(attribution.compact_set)
    assert verdict.p_full == attribution.p_full[0]
    assert verdict.p_blank == attribution.p_blank[0]
    assert verdict.insight == attribution.insertion[k, 0]
    assert verdict.necessity == pytest.approx(1 - attribution.deletion[k, 0])
    assert verdict.perceptual_influence == pytest.approx(perceptual_influence(attribution))


def test_perceptual_influence_by_hand() -> None:
    case = analytic_case("grounded", 16)
    a = EagleSearch(case.scorer).attribute(IMAGE, grid_partition(IMAGE, 4, 4), case.targets)
    curve = a.insertion[:, 0]
    x = np.linspace(0, 1, 17)  # equal grid cells
    expected = sum(
        (x[i + 1] - x[i]) * ((curve[i] - curve.min()) + (curve[i + 1] - curve.min())) / 2
        for i in range(16)
    )
    assert perceptual_influence(a) == pytest.approx(expected)


def test_thresholds_are_validated() -> None:
    with pytest.raises(ValueError, match="min_prior_ratio must be a number in \\[0, 1\\], got: 2"):
        PriorThresholds(min_prior_ratio=2)


def test_stricter_prior_threshold_changes_the_label() -> None:
    case = analytic_case("prior_driven", 16)
    attribution = EagleSearch(case.scorer).attribute(
        IMAGE, grid_partition(IMAGE, 4, 4), case.targets
    )
    assert judge(attribution)[0].label is VerdictLabel.LANGUAGE_PRIOR
    strict = PriorThresholds(max_prior_drop=0.0)
    assert judge(attribution, strict)[0].label is VerdictLabel.GROUNDED
