"""The baseline detectors on the analytic scorer, whose answers are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.baselines import (
    contrastive_decoding,
    image_free_contrast,
    low_confidence,
    occlusion,
    order_from_values,
    rise,
    score_selections,
)
from detectors.regions import grid_partition
from detectors.scorers.analytic import AnalyticScorer, TokenResponse, analytic_case


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def _setup(n: int = 16):  # type: ignore[no-untyped-def]
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    return image, grid_partition(image, 4, n // 4)


def _additive() -> tuple[AnalyticScorer, TokenResponse]:
    weights = np.zeros(16)
    weights[[2, 9]] = [3.0, 1.0]
    response = TokenResponse(bias=-2.0, weights=weights)
    return AnalyticScorer({1: response}), response


def test_low_confidence_and_image_free_contrast_are_closed_form() -> None:
    case = analytic_case("grounded")
    image, partition = _setup()
    response = case.scorer.response(1)
    p_full = _sigmoid(response.bias + float(response.weights.sum()))
    p_blank = _sigmoid(response.bias)
    low = low_confidence(case.scorer, image, partition, case.targets)
    assert low.forward_passes == 1
    assert low.scores[0] == pytest.approx(1.0 - p_full, abs=1e-12)
    contrast = image_free_contrast(case.scorer, image, partition, case.targets)
    assert contrast.forward_passes == 2
    assert contrast.scores[0] == pytest.approx(p_blank / p_full, rel=1e-9)


def test_contrastive_decoding_is_the_vcd_contrast() -> None:
    # the analytic scorer reads only which regions are kept: the distorted image (every
    # region replaced by the blur) scores as the blank image
    scorer, _ = _additive()
    image, partition = _setup()
    targets = (analytic_case("grounded").targets[0],)
    p_full, p_blank = _sigmoid(2.0), _sigmoid(-2.0)
    for alpha in (0.5, 1.0, 2.0):
        out = contrastive_decoding(scorer, image, partition, targets, alpha=alpha)
        expected = -((1 + alpha) * np.log(p_full) - alpha * np.log(p_blank))
        assert out.scores[0] == pytest.approx(expected, rel=1e-9)
        assert out.forward_passes == 2
    with pytest.raises(ValueError, match="alpha"):
        contrastive_decoding(scorer, image, partition, targets, alpha=0.0)


def test_occlusion_drops_are_closed_form() -> None:
    scorer, response = _additive()
    image, partition = _setup()
    targets = (analytic_case("grounded").targets[0],)
    out = occlusion(scorer, image, partition, targets)
    assert out.forward_passes == 17
    assert out.region_values is not None and out.region_values.shape == (16, 1)
    p_full = _sigmoid(2.0)
    for region in range(16):
        without = _sigmoid(2.0 - float(response.weights[region]))
        assert out.region_values[region, 0] == pytest.approx((p_full - without) / p_full)
    assert out.scores[0] == pytest.approx(1.0 - (p_full - _sigmoid(-1.0)) / p_full)
    assert list(order_from_values(out.region_values[:, 0])[:2]) == [2, 9]


def test_rise_finds_the_evidence_and_does_not_depend_on_batch_size() -> None:
    scorer, _ = _additive()
    image, partition = _setup()
    targets = (analytic_case("grounded").targets[0],)
    small = rise(scorer, image, partition, targets, n_masks=400, seed=3, batch_size=1)
    large = rise(scorer, image, partition, targets, n_masks=400, seed=3, batch_size=64)
    assert small.forward_passes == 401
    assert small.region_values is not None and large.region_values is not None
    np.testing.assert_allclose(small.region_values, large.region_values, atol=1e-12)
    np.testing.assert_allclose(small.scores, large.scores, atol=1e-12)
    assert list(order_from_values(small.region_values[:, 0])[:2]) == [2, 9]
    # regions without evidence have a value near 0 (sampling noise only)
    rest = np.delete(small.region_values[:, 0], [2, 9])
    assert np.abs(rest).max() < 0.1
    with pytest.raises(ValueError, match="n_masks"):
        rise(scorer, image, partition, targets, n_masks=1)


@pytest.mark.parametrize("method", ["occlusion", "rise", "image_free_contrast"])
def test_a_prior_driven_token_scores_above_a_grounded_one(method: str) -> None:
    image, partition = _setup()
    scores = {}
    for name in ("grounded", "prior_driven"):
        case = analytic_case(name)
        if method == "occlusion":
            out = occlusion(case.scorer, image, partition, case.targets)
        elif method == "rise":
            out = rise(case.scorer, image, partition, case.targets, n_masks=64)
        else:
            out = image_free_contrast(case.scorer, image, partition, case.targets)
        scores[name] = float(out.scores[0])
    assert scores["prior_driven"] > scores["grounded"]


def test_single_word_visual_baselines_credit_the_donor_of_borrowed_evidence() -> None:
    # the absent fork rests on the knife's regions: occlusion finds a region whose removal
    # collapses it, exactly as for the real knife, so it cannot tell the two apart
    case = analytic_case("borrowed_evidence")
    image, partition = _setup()
    out = occlusion(case.scorer, image, partition, case.targets)
    assert out.region_values is not None
    knife_regions = case.evidence[0]
    fork_top = int(order_from_values(out.region_values[:, 1])[0])
    assert fork_top in knife_regions
    assert abs(float(out.scores[1]) - float(out.scores[0])) < 0.1


def test_score_selections_chunks_and_validates() -> None:
    scorer, _ = _additive()
    image, partition = _setup()
    targets = (analytic_case("grounded").targets[0],)
    keep = np.random.default_rng(0).random((37, 16)) < 0.5
    whole = score_selections(scorer, image, partition, keep, targets, batch_size=64)
    chunked = score_selections(scorer, image, partition, keep, targets, batch_size=5)
    assert whole.shape == (37, 1)
    np.testing.assert_allclose(whole, chunked, atol=1e-12)
    with pytest.raises(ValueError, match="keep must be"):
        score_selections(scorer, image, partition, keep[:, :8], targets)
    with pytest.raises(ValueError, match="batch_size"):
        score_selections(scorer, image, partition, keep, targets, batch_size=0)


def test_order_from_values_breaks_ties_by_region_id() -> None:
    assert list(order_from_values(np.array([0.1, 0.5, 0.5, -1.0]))) == [1, 2, 0, 3]
    with pytest.raises(ValueError, match=r"\(R,\)"):
        order_from_values(np.zeros((2, 2)))


def test_the_baselines_and_the_cascade_import_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, detectors.baselines, detectors.cascade;"
        "print(','.join(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
