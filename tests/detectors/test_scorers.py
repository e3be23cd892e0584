from __future__ import annotations

import numpy as np
import pytest

from detectors import Fill, Target, grid_partition
from detectors.errors import InvalidTargetError, PartitionError
from detectors.scorers import (
    CASE_NAMES,
    AnalyticScorer,
    MaskedBatch,
    Scorer,
    TokenResponse,
    analytic_case,
)

IMAGE = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
PARTITION = grid_partition(IMAGE, 2, 2)


def test_pixels_keep_visible_regions_and_fill_the_rest() -> None:
    keep = np.array([[True, False, False, False], [False, False, False, True]])
    batch = MaskedBatch(image=IMAGE, partition=PARTITION, keep=keep, fill=Fill.BLACK)
    pixels = batch.pixels()
    assert pixels.shape == (2, 4, 4, 3) and pixels.dtype == np.uint8
    assert (pixels[0, :2, :2] == IMAGE[:2, :2]).all()
    assert (pixels[0, 2:] == 0).all() and (pixels[0, :2, 2:] == 0).all()
    assert (pixels[1, 2:, 2:] == IMAGE[2:, 2:]).all()


def test_mean_and_grey_fill() -> None:
    keep = np.zeros((1, 4), dtype=np.bool_)
    mean = MaskedBatch(image=IMAGE, partition=PARTITION, keep=keep, fill=Fill.MEAN).pixels()[0]
    expected = np.rint(IMAGE.reshape(-1, 3).mean(axis=0))
    assert (mean == expected).all()
    grey = MaskedBatch(image=IMAGE, partition=PARTITION, keep=keep, fill="grey").pixels()[0]  # type: ignore[arg-type]
    assert (grey == 128).all()


def test_blur_fill_is_smooth_and_keeps_mean_colour() -> None:
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    partition = grid_partition(image, 2, 2)
    blurred = (
        MaskedBatch(
            image=image, partition=partition, keep=np.zeros((1, 4), np.bool_), fill=Fill.BLUR
        )
        .pixels()[0]
        .astype(float)
    )
    assert blurred.std() < image.astype(float).std() / 4
    assert abs(blurred.mean() - image.mean()) < 10


def test_masked_batch_rejects_mismatches() -> None:
    with pytest.raises(PartitionError, match=r"\(B, 4\) bool"):
        MaskedBatch(image=IMAGE, partition=PARTITION, keep=np.ones((1, 3), np.bool_))
    with pytest.raises(PartitionError, match="does not match"):
        MaskedBatch(image=IMAGE[:2], partition=PARTITION, keep=np.ones((1, 4), np.bool_))


def test_analytic_probability_is_the_closed_form() -> None:
    response = TokenResponse(
        bias=-1.0, weights=np.array([2.0, 0.5, 0.0, 0.0]), interactions=((0, 1, 3.0),)
    )
    scorer = AnalyticScorer({7: response})
    keep = np.array([[False] * 4, [True, False, False, False], [True, True, False, False]])
    target = Target(position=0, token_id=7)
    got = scorer.score(MaskedBatch(image=IMAGE, partition=PARTITION, keep=keep), [target])
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert got[:, 0] == pytest.approx([sigmoid(-1.0), sigmoid(1.0), sigmoid(4.5)])
    assert isinstance(scorer, Scorer)


def test_analytic_scorer_refuses_unknown_tokens() -> None:
    scorer = AnalyticScorer({1: TokenResponse(bias=0.0, weights=np.zeros(4))})
    with pytest.raises(InvalidTargetError, match=r"knows token ids \[1\]"):
        scorer.probabilities(np.ones((1, 4), np.bool_), [Target(position=0, token_id=2)])


@pytest.mark.parametrize("name", CASE_NAMES)
def test_named_cases_behave_as_described(name: str) -> None:
    case = analytic_case(name, 16)
    keep_all, keep_none = np.ones((1, 16), np.bool_), np.zeros((1, 16), np.bool_)
    for target, evidence in zip(case.targets, case.evidence, strict=True):
        p_full = case.scorer.probabilities(keep_all, [target])[0, 0]
        p_blank = case.scorer.probabilities(keep_none, [target])[0, 0]
        if name == "prior_driven":
            assert p_blank > 0.9 and p_full > 0.9
            continue
        assert p_full > 0.95 and p_blank < 0.05
        without = keep_all.copy()
        without[0, sorted(evidence)] = False
        only = ~without
        assert case.scorer.probabilities(without, [target])[0, 0] < 0.1
        assert case.scorer.probabilities(only, [target])[0, 0] > 0.9


def test_unknown_case_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown analytic case"):
        analytic_case("nope")
