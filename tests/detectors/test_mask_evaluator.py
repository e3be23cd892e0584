"""`MaskEvaluator`: what a search's forward passes cost and what a scorer may return.

The search's result depends on these details without showing them (a mask scored twice costs a
pass twice, a fill not passed on changes every probability a little), so they are pinned here
against scorers that report what they were asked."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from detectors import SearchBudget, grid_partition
from detectors.errors import ScorerContractError
from detectors.scorers.masked import MaskedBatch
from detectors.search.evaluator import MaskEvaluator
from detectors.types import Fill, StopReason, Target

IMAGE = np.full((16, 16, 3), 90, dtype=np.uint8)
PARTITION = grid_partition(IMAGE, 2, 2)
TARGETS = (Target(position=0, token_id=1, text="cat"),)


class Recording:
    """A scorer that answers the share of visible regions (or what `answer` gives) and keeps
    every batch it was asked to score."""

    name = "recording"

    def __init__(self, max_batch_size: int = 16, answer: object = None) -> None:
        self.max_batch_size = max_batch_size
        self.answer = answer
        self.batches: list[MaskedBatch] = []

    def score(self, batch: MaskedBatch, targets: Sequence[Target]) -> np.ndarray:
        self.batches.append(batch)
        if self.answer is not None:
            return self.answer  # type: ignore[return-value]
        share = batch.keep.mean(axis=1, keepdims=True)
        return np.repeat(share, len(targets), axis=1)


def _rows(*masks: str) -> np.ndarray:
    return np.array([[c == "1" for c in m] for m in masks], dtype=bool)


@pytest.mark.parametrize("fill", list(Fill))
def test_the_requested_fill_reaches_the_scorer(fill: Fill) -> None:
    scorer = Recording()
    MaskEvaluator(scorer, IMAGE, PARTITION, TARGETS, fill=fill).evaluate(_rows("1000"))
    assert [b.fill for b in scorer.batches] == [fill]
    assert scorer.batches[0].keep.dtype == np.bool_


def test_a_mask_is_scored_once_and_then_comes_from_the_cache_for_free() -> None:
    scorer = Recording()
    ev = MaskEvaluator(scorer, IMAGE, PARTITION, TARGETS)
    out = ev.evaluate(_rows("1100", "1100", "0011", "1100"))  # one mask three times
    assert out[:, 0].tolist() == [0.5, 0.5, 0.5, 0.5]
    assert [b.keep.shape[0] for b in scorer.batches] == [2]  # two distinct masks
    assert ev.passes == ev.total_passes == 2
    again = ev.evaluate(_rows("0011", "1111"))
    assert again[:, 0].tolist() == [0.5, 1.0]
    assert ev.passes == 3 and [b.keep.shape[0] for b in scorer.batches] == [2, 1]


def test_without_the_cache_every_row_costs_a_pass() -> None:
    scorer = Recording()
    ev = MaskEvaluator(scorer, IMAGE, PARTITION, TARGETS, cache=False)
    ev.evaluate(_rows("1100", "1100", "1100"))
    assert ev.passes == 3


def test_rows_go_in_chunks_of_the_smaller_batch_size_and_stop_at_the_budget() -> None:
    scorer = Recording(max_batch_size=2)
    ev = MaskEvaluator(scorer, IMAGE, PARTITION, TARGETS)
    ev.begin(SearchBudget(max_forward_passes=5, batch_size=16))
    masks = ["1000", "0100", "0010", "0001", "1100", "0011", "1111"]
    out = ev.evaluate(_rows(*masks))
    assert [b.keep.shape[0] for b in scorer.batches] == [2, 2, 1]
    assert out.shape == (5, 1) and ev.passes == 5
    assert ev.stop_reason is StopReason.FORWARD_BUDGET and ev.remaining_passes == 0
    # a prefix only: the rows after the first unscored one are not returned
    assert ev.evaluate(_rows("1000", "0110", "0100")).shape == (1, 1)


def test_nothing_scored_is_an_empty_answer_of_the_targets_width() -> None:
    ev = MaskEvaluator(Recording(), IMAGE, PARTITION, TARGETS)
    ev.begin(SearchBudget(max_forward_passes=2))
    ev.evaluate(_rows("1000", "0100"))
    assert ev.evaluate(_rows("0010")).shape == (0, 1)


def test_rounding_at_the_ends_of_the_unit_interval_is_clipped() -> None:
    answer = np.array([[1.0 + 5e-7], [-5e-7]])
    ev = MaskEvaluator(Recording(answer=answer), IMAGE, PARTITION, TARGETS)
    out = ev.evaluate(_rows("1000", "0100"))
    assert out.dtype == np.float64 and out[:, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (np.array([[1.0 + 2e-6]]), r"in \[0, 1\], got values in \[1, 1\]"),
        (np.array([[-2e-6]]), r"in \[0, 1\], got values in \[-2e-06, -2e-06\]"),
        (np.array([[np.nan]]), "non-finite"),
        (np.zeros((2, 1)), r"shape \(1, 1\) \(masked images, targets\), got \(2, 1\)"),
        ([[0.5]], r"shape \(1, 1\) \(masked images, targets\), got list"),
    ],
)
def test_a_scorer_breaking_its_contract_is_named(answer: object, message: str) -> None:
    ev = MaskEvaluator(Recording(answer=answer), IMAGE, PARTITION, TARGETS)
    with pytest.raises(ScorerContractError, match=message):
        ev.evaluate(_rows("1000"))
    assert ev.passes == 0  # a broken answer costs no pass
