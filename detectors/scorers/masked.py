"""A batch of masked versions of one image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detectors.errors import PartitionError
from detectors.regions import RegionPartition, validate_image
from detectors.types import Fill

__all__ = ["MaskedBatch", "fill_image"]


def fill_image(image: np.ndarray, fill: Fill) -> np.ndarray:
    """`(H, W, 3)` uint8: what the pixels of removed regions become."""
    if fill is Fill.BLACK:
        return np.zeros_like(image)
    if fill is Fill.GREY:
        return np.full_like(image, 128)
    if fill is Fill.MEAN:
        mean = np.rint(image.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
        return np.broadcast_to(mean, image.shape).copy()
    if fill is Fill.BLUR:
        import cv2

        sigma = max(image.shape[:2]) / 16.0
        return np.asarray(cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma))
    raise ValueError(f"unknown fill: {fill!r}")


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class MaskedBatch:
    """B masked versions of one image, described by which regions stay visible.

    Attributes:
        image: `(H, W, 3)` uint8, the original image.
        partition: its regions (R of them).
        keep: `(B, R)` bool, True = region visible.
        fill: what removed pixels become.
    """

    image: np.ndarray
    partition: RegionPartition
    keep: np.ndarray
    fill: Fill = Fill.BLACK

    def __post_init__(self) -> None:
        validate_image(self.image)
        if self.partition.shape != self.image.shape[:2]:
            raise PartitionError(
                f"partition shape {self.partition.shape} does not match image shape "
                f"{self.image.shape[:2]}"
            )
        keep = self.keep
        if (
            not isinstance(keep, np.ndarray)
            or keep.dtype != np.bool_
            or keep.ndim != 2
            or keep.shape[1] != self.partition.n_regions
        ):
            raise PartitionError(
                f"keep must be a (B, {self.partition.n_regions}) bool array, got "
                f"{getattr(keep, 'shape', type(keep).__name__)}"
            )
        object.__setattr__(self, "fill", Fill(self.fill))

    @property
    def size(self) -> int:
        return int(self.keep.shape[0])

    def pixel_masks(self) -> np.ndarray:
        """`(B, H, W)` bool, True where the original pixel is kept."""
        return self.partition.masks(self.keep)

    def pixels(self) -> np.ndarray:
        """`(B, H, W, 3)` uint8 masked images (removed regions replaced by the fill)."""
        filled = fill_image(self.image, self.fill)
        return np.where(self.pixel_masks()[..., None], self.image[None], filled[None])
