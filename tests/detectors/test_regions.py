from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import data

from detectors import RegionPartition, grid_partition, slic_partition
from detectors.errors import ImageGeometryError, InvalidImageError, PartitionError
from detectors.regions import slic_region_side


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _covers_once(partition: RegionPartition, shape: tuple[int, int]) -> None:
    n = partition.n_regions
    assert partition.labels.shape == shape
    assert partition.labels.dtype == np.int32
    # every id 0..R-1 is used, and the masks of all regions add up to exactly one per pixel
    assert set(np.unique(partition.labels)) == set(range(n))
    masks = partition.masks(np.eye(n, dtype=np.bool_))
    assert masks.shape == (n, *shape)
    assert (masks.sum(axis=0) == 1).all()
    assert partition.areas.sum() == shape[0] * shape[1]
    assert partition.area_fractions.sum() == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(2, 60), w=st.integers(2, 60), rows=st.integers(1, 8), cols=st.integers(1, 8))
def test_grid_covers_every_pixel_once(h: int, w: int, rows: int, cols: int) -> None:
    if rows * cols < 2 or rows > h or cols > w:
        with pytest.raises(PartitionError):
            grid_partition(_noise(h, w), rows, cols)
        return
    partition = grid_partition(_noise(h, w), rows, cols)
    assert partition.n_regions == rows * cols
    _covers_once(partition, (h, w))


@settings(max_examples=25, deadline=None)
@given(h=st.integers(16, 96), w=st.integers(16, 96), n=st.integers(2, 80), seed=st.integers(0, 99))
def test_slic_covers_every_pixel_once(h: int, w: int, n: int, seed: int) -> None:
    side = math.floor(math.sqrt(h * w / n))
    if side > min(h, w):  # regions wider than the short side: refused, never handed to OpenCV
        with pytest.raises(ImageGeometryError, match="too thin"):
            slic_partition(_noise(h, w, seed), n)
        return
    partition = slic_partition(_noise(h, w, seed), n)
    _covers_once(partition, (h, w))
    assert partition.method.startswith("slico")


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_slic_on_real_photographs(name: str) -> None:
    image = getattr(data, name)()
    partition = slic_partition(image, 64)
    _covers_once(partition, image.shape[:2])
    # the division number is a target, not a promise: it varies a little around D
    assert 40 <= partition.n_regions <= 90


def test_slic_regions_follow_image_edges() -> None:
    # two flat halves: no SLICO region should straddle the boundary by much
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, 32:] = 255
    partition = slic_partition(image, 16)
    for region in range(partition.n_regions):
        cols = np.nonzero(partition.labels == region)[1]
        left = (cols < 32).mean()
        assert left < 0.05 or left > 0.95


def test_skimage_fallback_covers_every_pixel(monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    monkeypatch.delattr(cv2, "ximgproc")
    partition = slic_partition(_noise(48, 48), 16)
    assert partition.method.startswith("skimage-slico")
    _covers_once(partition, (48, 48))


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((8, 8), dtype=np.uint8), "shape"),
        (np.zeros((8, 8, 4), dtype=np.uint8), "shape"),
        (np.zeros((8, 8, 3), dtype=np.float32), "uint8"),
        (np.zeros((0, 8, 3), dtype=np.uint8), "empty"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_bad_images_are_refused_with_a_reason(image: object, message: str) -> None:
    with pytest.raises(InvalidImageError, match=message):
        slic_partition(image, 16)  # type: ignore[arg-type]
    with pytest.raises(InvalidImageError, match=message):
        grid_partition(image, 2, 2)  # type: ignore[arg-type]


def test_too_small_for_two_regions() -> None:
    with pytest.raises(PartitionError, match="at least 2"):
        slic_partition(_noise(8, 8), 1)
    with pytest.raises(PartitionError, match="cannot be split"):
        slic_partition(_noise(1, 1), 4)
    with pytest.raises(PartitionError, match="at least 2"):
        grid_partition(_noise(4, 4), 1, 1)


def test_partition_validates_labels() -> None:
    with pytest.raises(PartitionError, match="every id"):
        RegionPartition(np.array([[0, 2], [2, 0]], dtype=np.int32))
    with pytest.raises(PartitionError, match="int32"):
        RegionPartition(np.array([[0, 1]], dtype=np.int64))
    relabelled = RegionPartition.from_labels(np.array([[5, 9], [9, 7]]))
    assert relabelled.labels.tolist() == [[0, 2], [2, 1]]


def test_masks_select_regions_and_reject_bad_selections() -> None:
    partition = grid_partition(_noise(4, 4), 2, 2)
    keep = np.array([[True, False, False, True]])
    assert partition.masks(keep)[0].astype(int).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 1],
        [0, 0, 1, 1],
    ]
    with pytest.raises(PartitionError, match=r"\(B, 4\) bool"):
        partition.masks(np.ones((1, 3), dtype=np.bool_))


def test_partition_does_not_freeze_the_callers_array() -> None:
    labels = np.array([[0, 1]], dtype=np.int32)
    partition = RegionPartition(labels)
    assert labels.flags.writeable
    assert not partition.labels.flags.writeable


# Geometries measured to crash OpenCV's SLIC with SIGSEGV (issue 11), as (H, W).
# Geometries measured to crash OpenCV's SLIC with SIGSEGV at 64 regions (issue 11), as (H, W).
CRASHING = [(1, 20000), (20000, 1), (1, 5000), (2, 2000), (4, 4000), (20, 2000)]


@pytest.mark.parametrize(("h", "w"), CRASHING)
def test_geometries_that_crash_opencv_are_refused_before_it_runs(h: int, w: int) -> None:
    with pytest.raises(ImageGeometryError, match=f"{h}x{w} pixels") as caught:
        slic_partition(_noise(h, w), 64)
    assert isinstance(caught.value, PartitionError)  # callers that catch PartitionError still do


def test_region_side_rule() -> None:
    assert slic_region_side(96, 96, 48) == 13
    assert slic_region_side(96, 1920, 48) == 61  # 20:1 at the audit size still partitions
    with pytest.raises(ImageGeometryError, match=r"too thin .* 64 regions of about 15x15"):
        slic_region_side(4, 4000, 64)
    with pytest.raises(ImageGeometryError, match="one pixel per region"):
        slic_region_side(4, 4, 64)
    with pytest.raises(PartitionError, match="at least 2"):
        slic_region_side(96, 96, 1)


def test_degenerate_geometry_never_crashes_the_process() -> None:
    # In a child process: before the check, these shapes killed the interpreter with SIGSEGV.
    code = (
        "import numpy as np\n"
        "from detectors import slic_partition\n"
        "from detectors.errors import ImageGeometryError\n"
        "for h, w in [(20000, 1), (1, 5000), (2, 2000), (4, 4000)]:\n"
        "    try:\n"
        "        slic_partition(np.zeros((h, w, 3), np.uint8), 64)\n"
        "    except ImageGeometryError:\n"
        "        print('refused', h, w)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:4] == [
        "refused 20000 1",
        "refused 1 5000",
        "refused 2 2000",
        "refused 4 4000",
    ]
