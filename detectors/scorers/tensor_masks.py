"""Masking in tensor space: masked pixel batches built from the preprocessed image.

The image processor is run twice per sample (on the image and on its fill image); each masked
variant is then a per-pixel blend of the two tensors, weighted by the kept regions' masks
resized to the model's input grid.  When the processor does not resize (the input already has
the model's size) this equals masking in pixel space and preprocessing each variant, up to
float rounding: the processor's rescale and normalise are affine per channel.  When it resizes,
the two differ only along region borders, where the resize mixes kept and removed pixels; the
tests measure that difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detectors.regions import RegionPartition

__all__ = ["InputGeometry", "soft_region_masks"]


@dataclass(frozen=True, kw_only=True, slots=True)
class InputGeometry:
    """How the image processor maps an `(H, W)` image onto the model's input grid:
    resize to `resize_hw`, then crop `crop_box` = (top, left, height, width)."""

    resize_hw: tuple[int, int]
    crop_box: tuple[int, int, int, int]

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.crop_box[2], self.crop_box[3]

    @classmethod
    def shortest_edge_then_crop(
        cls, image_hw: tuple[int, int], shortest_edge: int, crop_hw: tuple[int, int] | None
    ) -> InputGeometry:
        """CLIP's geometry: shortest edge resized to `shortest_edge`, then a centre crop."""
        h, w = image_hw
        if h <= w:
            rh, rw = shortest_edge, int(shortest_edge * w / h)
        else:
            rh, rw = int(shortest_edge * h / w), shortest_edge
        if crop_hw is None:
            return cls(resize_hw=(rh, rw), crop_box=(0, 0, rh, rw))
        ch, cw = crop_hw
        top, left = (rh - ch) // 2, (rw - cw) // 2
        return cls(resize_hw=(rh, rw), crop_box=(top, left, ch, cw))

    @classmethod
    def resize_to(cls, hw: tuple[int, int]) -> InputGeometry:
        return cls(resize_hw=hw, crop_box=(0, 0, hw[0], hw[1]))


def soft_region_masks(partition: RegionPartition, geometry: InputGeometry) -> np.ndarray:
    """`(R, h, w)` float32: each region's share of every input-grid pixel (they sum to 1).

    Identity geometry gives the exact 0/1 region masks."""
    labels = partition.labels
    n = partition.n_regions
    top, left, ch, cw = geometry.crop_box
    if geometry.resize_hw == labels.shape:
        onehot = labels[None] == np.arange(n)[:, None, None]
        return np.asarray(onehot[:, top : top + ch, left : left + cw], dtype=np.float32)
    import cv2

    rh, rw = geometry.resize_hw
    out = np.empty((n, ch, cw), dtype=np.float32)
    for r in range(n):
        indicator = (labels == r).astype(np.float32)
        resized = cv2.resize(indicator, (rw, rh), interpolation=cv2.INTER_AREA)
        out[r] = resized[top : top + ch, left : left + cw]
    total = out.sum(axis=0, keepdims=True)
    return np.asarray(out / np.maximum(total, 1e-12), dtype=np.float32)
