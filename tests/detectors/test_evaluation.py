from __future__ import annotations

import numpy as np
import pytest

from detectors import EagleSearch, SearchBudget, grid_partition
from detectors.evaluation import (
    amcr,
    area_fractions,
    attribution_aucs,
    average_highest_confidence,
    csr_at,
    deletion_auc,
    insertion_auc,
    minimal_correction_region,
    order_curves,
    order_from_saliency,
    pointing_game,
    pointing_game_score,
    sensitive_tokens,
)
from detectors.scorers import analytic_case

IMAGE = np.zeros((4, 8, 3), dtype=np.uint8)
# 2 unequal regions would be nicer, but a 1x4 grid of a width-8 image gives areas 8,8,8,8
PARTITION = grid_partition(IMAGE, 1, 4)


def test_area_fractions_follow_the_order() -> None:
    image = np.zeros((1, 10, 3), dtype=np.uint8)
    partition = grid_partition(image, 1, 3)  # widths 4, 3, 3
    assert partition.areas.tolist() == [4, 3, 3]
    assert area_fractions(partition, np.array([2, 0, 1])) == pytest.approx([0, 0.3, 0.7, 1.0])
    with pytest.raises(ValueError, match="exactly once"):
        area_fractions(partition, np.array([0, 0, 1]))


def test_aucs_by_hand() -> None:
    x = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    ins = np.array([0.0, 0.5, 1.0, 1.0, 1.0])
    dele = np.array([1.0, 0.0, 0.0, 0.0, 0.0])
    assert insertion_auc(x, ins) == pytest.approx(0.0625 + 0.1875 + 0.25 + 0.25)
    assert deletion_auc(x, dele) == pytest.approx(0.125)
    # several targets: the mean of their areas
    assert insertion_auc(x, np.stack([ins, np.ones(5)], axis=1)) == pytest.approx((0.75 + 1) / 2)
    with pytest.raises(ValueError, match="NaN"):
        insertion_auc(x, np.array([0, np.nan, 1, 1, 1.0]))


def test_exact_attribution_beats_reversed_order_on_its_own_curves() -> None:
    case = analytic_case("grounded", 16)
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    partition = grid_partition(image, 4, 4)
    a = EagleSearch(case.scorer).attribute(image, partition, case.targets)
    ins_auc, del_auc = attribution_aucs(a)
    ins, dele = order_curves(case.scorer, image, partition, a.order[::-1].copy(), case.targets)
    fractions = area_fractions(partition, a.order[::-1].copy())
    assert ins_auc > insertion_auc(fractions, ins)
    assert del_auc < deletion_auc(fractions, dele)
    replay_ins, replay_del = order_curves(
        case.scorer, image, partition, a.order, case.targets, batch_size=3
    )
    np.testing.assert_allclose(replay_ins, a.insertion)
    np.testing.assert_allclose(replay_del, a.deletion)


def test_budgeted_curves_must_be_replayed_first() -> None:
    case = analytic_case("grounded", 64)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    a = EagleSearch(case.scorer, SearchBudget(max_forward_passes=200)).attribute(
        image, grid_partition(image, 8, 8), case.targets
    )
    with pytest.raises(ValueError, match="order_curves"):
        attribution_aucs(a)


def test_average_highest_confidence_and_sensitive_tokens() -> None:
    assert average_highest_confidence(
        [np.array([0.1, 0.9, 0.5]), np.array([0.2, 0.3])]
    ) == pytest.approx(0.6)
    mask = sensitive_tokens(np.array([0.9, 0.5, 0.3]), np.array([0.1, 0.4, 0.05]))
    assert mask.tolist() == [True, False, True]


def test_pointing_game_box_and_mask() -> None:
    saliency = np.zeros((10, 10))
    saliency[2:4, 6:9] = 1.0  # the hottest region
    assert pointing_game(saliency, box=(6, 2, 9, 4))
    assert not pointing_game(saliency, box=(0, 0, 5, 5))
    mask = np.zeros((10, 10), dtype=bool)
    mask[2, 7] = True  # the maximal pixel nearest the centroid (2.5, 7); ties go to the first
    assert pointing_game(saliency, mask=mask)
    with pytest.raises(ValueError, match="exactly one"):
        pointing_game(saliency)
    assert pointing_game_score([True, False, True, True]) == 0.75


def test_minimal_correction_region_by_hand() -> None:
    order = np.array([0, 1, 2, 3])  # tail first: 3, then 2, ...
    # the answer becomes correct once regions 3 and 2 are removed
    mcr = minimal_correction_region(PARTITION, order, lambda keep: not keep[3] and not keep[2])
    assert mcr == pytest.approx(0.5)
    never = minimal_correction_region(PARTITION, order, lambda keep: False)
    assert never == 1.0
    assert amcr([0.05, 0.5, 1.0]) == pytest.approx(0.5166666)
    # CSR over all samples: a never-corrected sample stays in the denominator
    assert csr_at([0.05, 0.10, 1.0, 0.3], 0.10) == 0.5


def test_order_from_saliency_hottest_first() -> None:
    saliency = np.zeros((4, 8))
    saliency[:, 4:6] = 1.0  # region 2
    saliency[:, 0:2] = 0.5  # region 0
    assert order_from_saliency(PARTITION, saliency).tolist() == [2, 0, 1, 3]
