from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from detectors import EagleSearch, SearchBudget, grid_partition
from detectors.heatmap import colorize, overlay, save_png
from detectors.scorers import analytic_case

IMAGE = np.full((32, 32, 3), 90, dtype=np.uint8)
PARTITION = grid_partition(IMAGE, 4, 4)


def test_saliency_follows_the_marginal_gains() -> None:
    case = analytic_case("grounded", 16)
    a = EagleSearch(case.scorer).attribute(IMAGE, PARTITION, case.targets)
    f = a.objective
    values = -np.cumsum(np.abs(np.diff(f)))
    expected = (values - values.min()) / (values.max() - values.min())
    saliency = a.saliency()
    assert saliency.shape == (32, 32)
    for rank, region in enumerate(a.order):
        assert saliency[PARTITION.labels == region] == pytest.approx(expected[rank])
    assert saliency[PARTITION.labels == a.order[0]].max() == 1.0
    assert saliency.min() == 0.0
    # the evidence regions are the hottest
    hottest = {int(r) for r in a.order[:3]}
    assert hottest == set(case.evidence[0])


def test_budgeted_saliency_is_complete_and_ordered() -> None:
    case = analytic_case("grounded", 64)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    a = EagleSearch(case.scorer, SearchBudget(max_forward_passes=300)).attribute(
        image, grid_partition(image, 8, 8), case.targets
    )
    saliency = a.saliency()
    per_region = [saliency[a.partition.labels == r][0] for r in a.order]
    assert all(x >= y for x, y in itertools.pairwise(per_region))
    assert per_region[0] == 1.0 and per_region[-1] == 0.0


def test_overlay_is_an_rgb_picture(tmp_path: Path) -> None:
    case = analytic_case("grounded", 16)
    a = EagleSearch(case.scorer).attribute(IMAGE, PARTITION, case.targets)
    rgb = overlay(IMAGE, a)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    hot = PARTITION.labels == a.order[0]
    cold = PARTITION.labels == a.order[-1]
    # TURBO: hot regions lean red, cold ones blue
    assert rgb[hot][:, 0].mean() > rgb[hot][:, 2].mean()
    assert rgb[cold][:, 2].mean() > rgb[cold][:, 0].mean()
    path = tmp_path / "heat.png"
    save_png(rgb, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="alpha"):
        overlay(IMAGE, a, alpha=2.0)
    with pytest.raises(ValueError, match="covers"):
        overlay(np.zeros((8, 8, 3), np.uint8), a)


def test_colorize_maps_ends_of_the_scale() -> None:
    rgb = colorize(np.array([[0.0, 1.0]]))
    assert rgb.shape == (1, 2, 3)
    assert rgb[0, 0, 2] > rgb[0, 0, 0]  # low = blue-ish
    assert rgb[0, 1, 0] > rgb[0, 1, 2]  # high = red-ish


def test_measured_steps_are_those_with_both_ends_scored() -> None:
    from detectors.saliency import measured_steps

    order = np.array([2, 0, 3, 1])
    curve = np.array([0.0, 0.8, np.nan, np.nan, 1.0])  # F(empty), F(2), -, -, F(V)
    # region 2's gain was measured; 0, 3 and 1 come after an unscored prefix or before one
    assert measured_steps(order, curve).tolist() == [False, False, True, False]
    assert measured_steps(order, np.arange(5.0)).all()


def test_regions_the_budgeted_search_never_measured_are_drawn_neutral() -> None:
    from detectors.saliency import measured_regions

    case = analytic_case("grounded", 64)
    image = np.full((64, 64, 3), 90, dtype=np.uint8)
    partition = grid_partition(image, 8, 8)
    a = EagleSearch(case.scorer, SearchBudget(max_forward_passes=100)).attribute(
        image, partition, case.targets
    )
    measured = measured_regions(a)
    # the search measured its way through the evidence, then stopped (converged): the rest of
    # the order is the surrogate's guess
    assert {int(r) for r in np.flatnonzero(measured)} == set(case.evidence[0])
    interior = np.ones((64, 64), dtype=bool)  # away from the drawn boundaries
    interior[7::8, :] = interior[:, 7::8] = False
    rgb = overlay(image, a).astype(int)
    plain = overlay(image, a, neutral_unmeasured=False).astype(int)
    for region in range(64):
        inside = (partition.labels == region) & interior
        if measured[region]:  # coloured as before
            assert (rgb[inside] == plain[inside]).all()
        else:  # grey, 0.45 * 90 + 0.55 * 160 rounded, whatever its interpolated rank
            assert (rgb[inside] == 128).all()
