"""The budgeted search's surrogate: exact on a model additive in logit space, one greedy step
on it takes the region it predicts best, and the screening fills what the budget left out."""

from __future__ import annotations

import numpy as np
import pytest

from detectors import SearchBudget, Target, grid_partition
from detectors.scorers import AnalyticScorer
from detectors.scorers.analytic import TokenResponse
from detectors.search.evaluator import MaskEvaluator
from detectors.search.surrogate import LogitSurrogate, logit, screen

IMAGE = np.zeros((32, 32, 3), dtype=np.uint8)
PARTITION = grid_partition(IMAGE, 3, 3)  # 9 regions
WEIGHTS = np.array([2.0, -1.0, 0.5, 0.0, 3.0, -0.5, 1.0, 0.25, -2.0])
BIAS = -1.5


def _evaluator(response: TokenResponse, passes: int | None = None) -> MaskEvaluator:
    targets = [Target(position=0, token_id=0, text="cat")]
    evaluator = MaskEvaluator(AnalyticScorer({0: response}), IMAGE, PARTITION, targets)
    evaluator.begin(SearchBudget(max_forward_passes=passes))
    return evaluator


def _anchors(evaluator: MaskEvaluator) -> tuple[np.ndarray, np.ndarray]:
    n = evaluator.n_regions
    full, blank = evaluator.evaluate(np.stack([np.ones(n, np.bool_), np.zeros(n, np.bool_)]))
    return full, blank


def _true(keep: np.ndarray, weights: np.ndarray = WEIGHTS) -> float:
    return float(1.0 / (1.0 + np.exp(-(BIAS + weights[keep].sum()))))


def test_the_surrogate_is_exact_on_an_additive_model_at_every_step() -> None:
    evaluator = _evaluator(TokenResponse(bias=BIAS, weights=WEIGHTS))
    full, blank = _anchors(evaluator)
    columns = np.array([0])
    surrogate = screen(evaluator, full[columns], blank[columns], columns)
    chosen = np.zeros(9, np.bool_)
    for region in (4, 0, 8):  # grow S and compare every S + {v} with the model
        rest = np.flatnonzero(~chosen)
        ins, dele = surrogate.predict(rest)
        for i, v in enumerate(rest):
            keep = chosen.copy()
            keep[v] = True
            assert ins[i, 0] == pytest.approx(_true(keep), abs=1e-9)
            assert dele[i, 0] == pytest.approx(_true(~keep), abs=1e-9)
        keep = chosen.copy()
        keep[region] = True
        surrogate.advance(np.array([_true(keep)]), np.array([_true(~keep)]))
        chosen = keep


def test_a_greedy_step_on_the_surrogate_takes_the_best_predicted_region() -> None:
    evaluator = _evaluator(TokenResponse(bias=BIAS, weights=WEIGHTS))
    full, blank = _anchors(evaluator)
    columns = np.array([0])
    surrogate = screen(evaluator, full[columns], blank[columns], columns)
    rest = list(range(9))
    insight = lambda ins, dele: ins.mean(axis=1)  # noqa: E731 (F = insertion alone)
    order = [surrogate.take_best(rest, insight) for _ in range(9)]
    assert rest == [] and surrogate.k == 9
    assert order == list(np.argsort(-WEIGHTS, kind="stable"))  # by weight, ties by id
    twin = LogitSurrogate(np.zeros((3, 1)), np.zeros((3, 1)), blank[:1], full[:1])
    assert twin.take_best([2, 0, 1], insight) == 0  # all equal: the lowest id


def test_screening_under_a_small_budget_mirrors_deletion_and_fills_the_rest() -> None:
    # 2 anchors + 5 of the 9 deletion images: no insertion screening, 4 regions unscored
    evaluator = _evaluator(TokenResponse(bias=BIAS, weights=WEIGHTS), passes=7)
    full, blank = _anchors(evaluator)
    columns = np.array([0])
    surrogate = screen(evaluator, full[columns], blank[columns], columns)
    assert evaluator.stop_reason is not None and evaluator.total_passes == 7
    drops = surrogate.d[:, 0]
    assert drops[:5] == pytest.approx(WEIGHTS[:5], abs=1e-9)  # logit(full) - logit(without v)
    assert drops[5:] == pytest.approx([WEIGHTS[:5].mean()] * 4, abs=1e-9)
    assert np.array_equal(surrogate.a, surrogate.d)  # insertion taken to mirror deletion
    assert float(logit(np.array([0.5]))[0]) == 0.0
