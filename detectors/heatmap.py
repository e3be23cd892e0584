"""Pictures of attributions: saliency heatmaps over the image."""

from __future__ import annotations

import numpy as np

from detectors.regions import validate_image
from detectors.types import Attribution

__all__ = ["colorize", "draw", "overlay", "panel", "save_png"]


def colorize(values: np.ndarray) -> np.ndarray:
    """`(H, W)` floats in [0, 1] -> `(H, W, 3)` uint8 RGB with OpenCV's perceptual TURBO map."""
    import cv2

    scaled = np.clip(np.nan_to_num(values), 0.0, 1.0)
    bgr = cv2.applyColorMap(np.rint(scaled * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    return np.ascontiguousarray(bgr[..., ::-1])


def overlay(
    image: np.ndarray,
    attribution: Attribution,
    *,
    alpha: float = 0.6,
    boundaries: bool = True,
    neutral_unmeasured: bool = True,
) -> np.ndarray:
    """`(H, W, 3)` uint8 RGB: the saliency heatmap blended over the image, with region
    boundaries drawn when `boundaries` is set.  With `neutral_unmeasured` (the default),
    regions whose gain the search never measured (a budgeted search's interpolated tail) are
    drawn washed out in grey, not coloured as if they were evidence.  Save it with
    `save_png`."""
    from detectors.saliency import measured_regions, region_values

    image = validate_image(image)
    labels = attribution.partition.labels
    if labels.shape != image.shape[:2]:
        raise ValueError(f"the attribution covers {labels.shape}, the image is {image.shape[:2]}")
    measured = measured_regions(attribution) if neutral_unmeasured else None
    return draw(
        image, labels, region_values(attribution), measured, alpha=alpha, boundaries=boundaries
    )


def draw(
    base: np.ndarray,
    labels: np.ndarray,
    values: np.ndarray,
    measured: np.ndarray | None = None,
    *,
    alpha: float = 0.6,
    boundaries: bool = True,
) -> np.ndarray:
    """`(H, W, 3)` uint8 RGB: per-region `values` (`(R,)` in [0, 1], by region id) coloured over
    `base` (`(H, W, 3)`, the image or a neutral canvas) through `labels` (`(H, W)` region ids);
    regions where `measured` (`(R,)` bool) is False are washed out in grey instead."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got: {alpha}")
    if base.shape[:2] != labels.shape:
        raise ValueError(f"labels are {labels.shape}, the base is {base.shape[:2]}")
    saliency = np.asarray(values, dtype=np.float64)[labels]
    heat = colorize(saliency).astype(np.float64)
    plain = base.astype(np.float64)
    # cold regions fade out, so the eye lands on the evidence
    weight = alpha * (0.25 + 0.75 * saliency)[..., None]
    out = (1.0 - weight) * plain + weight * heat
    if measured is not None:
        unmeasured = ~np.asarray(measured, dtype=np.bool_)[labels]
        out[unmeasured] = 0.45 * plain[unmeasured] + 0.55 * 160.0
    if boundaries:
        edge = np.zeros(labels.shape, dtype=np.bool_)
        edge[:-1] |= labels[:-1] != labels[1:]
        edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        out[edge] = 0.6 * out[edge] + 0.4 * 255.0
    return np.asarray(np.clip(np.rint(out), 0, 255), dtype=np.uint8)


def save_png(rgb: np.ndarray, path: str) -> None:
    """Write an `(H, W, 3)` uint8 RGB array as a PNG file."""
    import cv2

    if not cv2.imwrite(path, np.ascontiguousarray(validate_image(rgb)[..., ::-1])):
        raise OSError(f"could not write PNG to {path}")


def panel(
    tiles: list[tuple[str, np.ndarray]], *, scale: int = 3, caption_height: int = 22
) -> np.ndarray:
    """Side-by-side tiles, each `(title, (H, W, 3) uint8)`, upscaled by `scale`, titled above."""
    import cv2

    if not tiles:
        raise ValueError("panel needs at least one tile")
    out = []
    for title, rgb in tiles:
        big = np.repeat(np.repeat(validate_image(rgb), scale, axis=0), scale, axis=1)
        head = np.full((caption_height, big.shape[1], 3), 255, dtype=np.uint8)
        cv2.putText(
            head,
            title,
            (4, caption_height - 7),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.42,
            (20, 20, 20),
            1,
            cv2.LINE_AA,
        )
        tile = np.concatenate([head, big], axis=0)
        gap = np.full((tile.shape[0], 6, 3), 255, dtype=np.uint8)
        out += [tile, gap]
    return np.concatenate(out[:-1], axis=1)
