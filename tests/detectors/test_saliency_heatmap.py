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
