"""`RegionShares`, the fast scorers' blend weights, against the dense soft-mask product."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors.reference import SceneKind, generate_scene
from detectors.regions import RegionPartition, grid_partition, slic_partition
from detectors.scorers.tensor_masks import InputGeometry, region_shares, soft_region_masks

TOLERANCE = 1e-6


def _keep(rows: int, regions: int, seed: int = 0) -> torch.Tensor:
    keep = np.random.default_rng(seed).random((rows, regions)) < 0.5
    keep[0], keep[1] = True, False
    return torch.from_numpy(keep.astype(np.float32))


def _dense(partition: RegionPartition, geometry: InputGeometry, keep: torch.Tensor) -> torch.Tensor:
    soft = soft_region_masks(partition, geometry)
    return keep @ torch.from_numpy(soft.reshape(soft.shape[0], -1))


def _scene(h: int, w: int) -> np.ndarray:
    """A synthetic scene (objects with edges, so SLIC regions have real borders) at `(h, w)`."""
    import cv2

    image = generate_scene(11_000_004, SceneKind.CLEAN).image
    return np.asarray(cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST))


@pytest.mark.parametrize(
    ("image_hw", "geometry"),
    [
        ((120, 100), InputGeometry.resize_to((64, 64))),  # downscale, both sides
        ((80, 100), InputGeometry.resize_to((112, 140))),  # upscale
        ((80, 100), InputGeometry.shortest_edge_then_crop((80, 100), 64, (64, 64))),
    ],
)
def test_shares_equal_the_dense_product_when_the_processor_resizes(
    image_hw: tuple[int, int], geometry: InputGeometry
) -> None:
    partition = slic_partition(_scene(*image_hw), 24)
    shares = region_shares(partition, geometry)
    keep = _keep(9, partition.n_regions)
    want = _dense(partition, geometry, keep)
    got = shares.kept(keep)
    assert got.shape == want.shape == (9, geometry.out_hw[0] * geometry.out_hw[1])
    assert float((got - want).abs().max()) <= TOLERANCE
    # the band is where the resize mixes regions: a thin part of the grid, and without it the
    # gather alone would be wrong there by a whole share
    band = int(shares.band.numel())
    assert 0 < band < 0.5 * want.shape[1]
    gather_only = keep.index_select(1, shares.labels)
    assert float((gather_only - want).abs().max()) > 0.2
    # off the band the gather is exact, not merely close
    off = torch.ones(want.shape[1], dtype=torch.bool)
    off[shares.band] = False
    assert torch.equal(got[:, off], want[:, off])


@pytest.mark.parametrize(
    "geometry",
    [
        InputGeometry.resize_to((80, 100)),
        InputGeometry.shortest_edge_then_crop((80, 100), 80, (64, 72)),  # crop, no resize
    ],
)
def test_shares_are_the_exact_region_masks_when_the_processor_does_not_resize(
    geometry: InputGeometry,
) -> None:
    partition = slic_partition(_scene(80, 100), 24)
    assert geometry.resize_hw == partition.labels.shape
    shares = region_shares(partition, geometry)
    keep = _keep(9, partition.n_regions)
    assert shares.band.numel() == 0
    assert torch.equal(shares.kept(keep), _dense(partition, geometry, keep))


def test_shares_write_into_a_given_buffer() -> None:
    partition = slic_partition(_scene(120, 100), 24)
    geometry = InputGeometry.resize_to((64, 64))
    shares = region_shares(partition, geometry)
    keep = _keep(5, partition.n_regions)
    buffer = torch.full((5, 64 * 64), float("nan"))
    got = shares.kept(keep, out=buffer)
    assert got.data_ptr() == buffer.data_ptr()
    assert float((buffer - _dense(partition, geometry, keep)).abs().max()) <= TOLERANCE


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(2, 6),
    cols=st.integers(2, 6),
    h=st.integers(12, 40),
    w=st.integers(12, 40),
    out_h=st.integers(8, 48),
    out_w=st.integers(8, 48),
    seed=st.integers(0, 2**16),
)
def test_shares_equal_the_dense_product_for_any_grid_and_resize(
    rows: int, cols: int, h: int, w: int, out_h: int, out_w: int, seed: int
) -> None:
    partition = grid_partition(np.zeros((h, w, 3), dtype=np.uint8), rows, cols)
    geometry = InputGeometry.resize_to((out_h, out_w))
    keep = _keep(4, partition.n_regions, seed)
    got = region_shares(partition, geometry).kept(keep)
    assert float((got - _dense(partition, geometry, keep)).abs().max()) <= TOLERANCE
