"""Splitting an image into regions: the units an EAGLE search keeps or removes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from detectors.errors import ImageGeometryError, InvalidImageError, PartitionError

__all__ = [
    "RegionPartition",
    "grid_partition",
    "slic_partition",
    "slic_region_side",
    "validate_image",
]


def validate_image(image: object) -> np.ndarray:
    """Return `image` if it is a non-empty `(H, W, 3)` uint8 array; raise `InvalidImageError`."""
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(
            "image must be a numpy array of shape (H, W, 3) and dtype uint8, "
            f"got: {type(image).__name__}"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidImageError(f"image must have shape (H, W, 3) (RGB), got shape: {image.shape}")
    if image.dtype != np.uint8:
        raise InvalidImageError(f"image must have dtype uint8, got: {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidImageError(f"image is empty: shape {image.shape}")
    return image


@dataclass(frozen=True, slots=True, eq=False)
class RegionPartition:
    """A partition of an image into regions: every pixel belongs to exactly one region.

    Attributes:
        labels: `(H, W)` int32 label map with ids 0..R-1, every id used.
        method: how it was made (recorded with every attribution), e.g. `slico(size=42)`.
    """

    labels: np.ndarray
    method: str = "custom"

    def __post_init__(self) -> None:
        labels = self.labels
        if not isinstance(labels, np.ndarray) or labels.ndim != 2 or labels.size == 0:
            raise PartitionError("labels must be a non-empty (H, W) integer array")
        if labels.dtype != np.int32:
            raise PartitionError(f"labels must have dtype int32, got: {labels.dtype}")
        counts = np.bincount(labels.ravel()) if labels.min() >= 0 else None
        if counts is None or (counts == 0).any():
            raise PartitionError(
                "labels must use every id 0..R-1 exactly (no negative or missing ids); "
                "use RegionPartition.from_labels to relabel an arbitrary label map"
            )
        if counts.shape[0] < 2:
            raise PartitionError(f"a partition needs at least 2 regions, got: {counts.shape[0]}")
        if labels.flags.writeable:  # freeze a private copy; never touch the caller's array
            labels = labels.copy()
            labels.setflags(write=False)
            object.__setattr__(self, "labels", labels)

    @classmethod
    def from_labels(cls, labels: np.ndarray, method: str = "custom") -> RegionPartition:
        """Relabel any integer label map to contiguous ids 0..R-1 (in order of first value)."""
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.size == 0:
            raise PartitionError(
                f"labels must be a non-empty (H, W) array, got shape: {labels.shape}"
            )
        _, inverse = np.unique(labels, return_inverse=True)
        return cls(inverse.reshape(labels.shape).astype(np.int32), method)

    @property
    def n_regions(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.labels.shape[0]), int(self.labels.shape[1]))

    @property
    def areas(self) -> np.ndarray:
        """`(R,)` int, pixels per region."""
        return np.bincount(self.labels.ravel(), minlength=self.n_regions)

    @property
    def area_fractions(self) -> np.ndarray:
        """`(R,)` float, share of the image per region (sums to 1)."""
        areas = self.areas
        return np.asarray(areas / areas.sum())

    def masks(self, keep: np.ndarray) -> np.ndarray:
        """Turn a `(B, R)` bool selection into `(B, H, W)` bool pixel masks (True = selected)."""
        keep = np.asarray(keep)
        if keep.ndim != 2 or keep.shape[1] != self.n_regions or keep.dtype != np.bool_:
            raise PartitionError(
                f"keep must be a (B, {self.n_regions}) bool array, got shape {keep.shape} "
                f"and dtype {keep.dtype}"
            )
        return keep[:, self.labels]


def _division_side(height: int, width: int, n_regions: int) -> int:
    """Region side for a division number D: floor(sqrt(H * W / D)), as in EAGLE."""
    return math.floor(math.sqrt(height * width / n_regions))


def slic_region_side(height: int, width: int, n_regions: int) -> int:
    """The SLICO region side for an `height` x `width` image split into about `n_regions`
    regions, once the geometry is known to be safe to hand to OpenCV.

    OpenCV's SLIC crashes the process (SIGSEGV, which Python cannot catch) when the region side
    reaches twice the image's short side (a 20000x1 or 4x4000 image, say); a side no larger
    than the short side was run on 3,000 random geometries without a crash.  So the region side
    must fit in the short side, which also bounds the aspect ratio by about `n_regions`.

    Raises:
        PartitionError: `n_regions` < 2.
        ImageGeometryError: fewer pixels than regions, or an image too thin for regions of
            that side.
    """
    if n_regions < 2:
        raise PartitionError(f"n_regions must be at least 2, got: {n_regions}")
    if height < 1 or width < 1:
        raise ImageGeometryError(f"an image of {height}x{width} pixels has no pixels")
    side = _division_side(height, width, n_regions)
    if height * width < 2 or side < 1:
        raise ImageGeometryError(
            f"an image of {height}x{width} pixels cannot be split into {n_regions} regions "
            "(need at least one pixel per region)"
        )
    short = min(height, width)
    if side > short:
        raise ImageGeometryError(
            f"an image of {height}x{width} pixels is too thin to be split into {n_regions} "
            f"regions of about {side}x{side} pixels: its short side must be at least the "
            f"region side (aspect ratio at most about {n_regions}:1, got "
            f"{max(height, width) / short:.0f}:1)"
        )
    return side


def slic_partition(
    image: np.ndarray, n_regions: int = 64, *, iterations: int = 10
) -> RegionPartition:
    """SLICO superpixels with about `n_regions` regions (the division number D of EAGLE).

    Uses OpenCV contrib's `ximgproc` SLICO on the CIELAB image; falls back to scikit-image's
    `slic(slic_zero=True)` when OpenCV contrib is not installed.  The number of regions varies a
    little around `n_regions`.  The geometry is checked (`slic_region_side`) before any native
    code runs.

    Raises:
        InvalidImageError: not a non-empty `(H, W, 3)` uint8 array.
        PartitionError: `n_regions` < 2.
        ImageGeometryError: the image is too small or too thin for `n_regions` regions.
    """
    image = validate_image(image)
    height, width = image.shape[:2]
    side = slic_region_side(height, width, n_regions)
    try:
        import cv2

        ximgproc = cv2.ximgproc
    except (ImportError, AttributeError):
        labels = _skimage_slico(image, n_regions, iterations)
        method = f"skimage-slico(n={n_regions})"
    else:
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
        while True:
            slic = ximgproc.createSuperpixelSLIC(lab, algorithm=ximgproc.SLICO, region_size=side)
            slic.iterate(iterations)
            slic.enforceLabelConnectivity(25)  # merge fragments under 25% of a superpixel
            labels = slic.getLabels()
            # On small images the seed grid can collapse to one region: try a finer one.
            if side == 1 or labels.max() > labels.min():
                break
            side = max(1, side // 2)
        method = f"slico(n={n_regions},size={side})"
    return RegionPartition.from_labels(labels, method)


def _skimage_slico(image: np.ndarray, n_regions: int, iterations: int) -> np.ndarray:
    from skimage.segmentation import slic

    return np.asarray(
        slic(image, n_segments=n_regions, slic_zero=True, max_num_iter=iterations, start_label=0)
    )


def grid_partition(image: np.ndarray, rows: int, cols: int) -> RegionPartition:
    """A `rows` x `cols` grid of near-equal rectangles (ids row-major).

    Raises:
        InvalidImageError: not a non-empty `(H, W, 3)` uint8 array.
        PartitionError: fewer than 2 cells, or more rows/columns than pixels.
    """
    image = validate_image(image)
    height, width = image.shape[:2]
    if rows < 1 or cols < 1 or rows * cols < 2:
        raise PartitionError(f"a grid needs at least 2 cells, got rows={rows}, cols={cols}")
    if rows > height or cols > width:
        raise PartitionError(
            f"a {rows}x{cols} grid does not fit an image of {height}x{width} pixels"
        )
    row_ids = (np.arange(height) * rows) // height
    col_ids = (np.arange(width) * cols) // width
    labels = (row_ids[:, None] * cols + col_ids[None, :]).astype(np.int32)
    return RegionPartition(labels, f"grid({rows}x{cols})")
