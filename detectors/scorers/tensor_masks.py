"""Masking in tensor space: masked pixel batches built from the preprocessed image.

The image processor is run twice per sample (on the image and on its fill image); each masked
variant is then a per-pixel blend of the two tensors, weighted by the kept regions' masks
resized to the model's input grid.  When the processor does not resize (the input already has
the model's size) this equals masking in pixel space and preprocessing each variant, up to
float rounding: the processor's rescale and normalise are affine per channel.  When it resizes,
the two differ only along region borders, where the resize mixes kept and removed pixels; the
tests measure that difference.

The blend needs, per variant, the share of every input pixel that its kept regions hold: a
`(b, R) x (R, h*w)` product with the soft masks.  Most pixels lie inside one region, whose share
is 1.0, so `RegionShares` stores a region id per pixel (a gather) and keeps dense shares only
for the band of pixels that a resize mixes (none without a resize).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from detectors.regions import RegionPartition

__all__ = ["InputGeometry", "RegionShares", "label_shares", "region_shares", "soft_region_masks"]


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
    return _soft_masks(partition.labels, partition.n_regions, geometry)


def _soft_masks(labels: np.ndarray, n: int, geometry: InputGeometry) -> np.ndarray:
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


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class RegionShares:
    """One partition's soft region masks on one input grid, stored for the blend: a region id
    per pixel, and dense shares only for the band of pixels that several regions share.

    Attributes (torch tensors on one device; P = h * w input pixels):
        labels: `(P,)` int64: the region that holds all of a pixel (on the band, its largest
            share, overwritten by the band's product).
        band: `(N,)` int64: the pixels not held whole by one region (share exactly 1.0).
        band_shares: `(R, N)` float32: those pixels' shares.
    """

    labels: Any
    band: Any
    band_shares: Any

    def kept(self, keep: Any, *, out: Any = None) -> Any:
        """`(b, P)` float32: the share of every pixel that the kept regions hold, for `(b, R)`
        float32 `keep`: `keep @ soft` up to float rounding on the band, exactly off it."""
        import torch

        share = torch.index_select(keep, 1, self.labels, out=out)
        if self.band.numel():
            share.index_copy_(1, self.band, keep @ self.band_shares)
        return share


def region_shares(
    partition: RegionPartition, geometry: InputGeometry, device: Any = "cpu"
) -> RegionShares:
    """`soft_region_masks(partition, geometry)` as `RegionShares` on `device`."""
    return label_shares(partition.labels, partition.n_regions, geometry, device)


def label_shares(
    label_map: np.ndarray, n: int, geometry: InputGeometry, device: Any = "cpu"
) -> RegionShares:
    """`RegionShares` of an `(H, W)` label map with ids 0..n-1 (some may be unused, and one
    region is allowed: a part of a partition, e.g. one image of several)."""
    import torch

    if geometry.resize_hw == label_map.shape:
        top, left, ch, cw = geometry.crop_box
        labels = label_map[top : top + ch, left : left + cw].reshape(-1).astype(np.int64)
        band = np.empty(0, dtype=np.int64)
        band_shares = np.empty((n, 0), dtype=np.float32)
    else:
        soft = _soft_masks(label_map, n, geometry).reshape(n, -1)
        labels = soft.argmax(axis=0)
        # off the band a pixel's shares are exactly one 1.0 and zeros, so the gather is exact
        whole = (soft[labels, np.arange(soft.shape[1])] == 1.0) & ((soft > 0).sum(axis=0) == 1)
        band = np.flatnonzero(~whole)
        band_shares = np.ascontiguousarray(soft[:, band])
    return RegionShares(
        labels=torch.from_numpy(labels).to(device),
        band=torch.from_numpy(band).to(device),
        band_shares=torch.from_numpy(band_shares).to(device),
    )
