"""Pictures of attributions: saliency heatmaps over the image."""

from __future__ import annotations

import numpy as np

from detectors.regions import validate_image
from detectors.types import Attribution

__all__ = ["colorize", "overlay", "save_png"]


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
    alpha: float = 0.5,
    boundaries: bool = True,
) -> np.ndarray:
    """`(H, W, 3)` uint8 RGB: the saliency heatmap blended over the image, with region
    boundaries drawn when `boundaries` is set.  Save it with `save_png`."""
    image = validate_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got: {alpha}")
    saliency = attribution.saliency()
    if saliency.shape != image.shape[:2]:
        raise ValueError(f"the attribution covers {saliency.shape}, the image is {image.shape[:2]}")
    heat = colorize(saliency).astype(np.float64)
    out = (1.0 - alpha) * image.astype(np.float64) + alpha * heat
    if boundaries:
        labels = attribution.partition.labels
        edge = np.zeros(labels.shape, dtype=np.bool_)
        edge[:-1] |= labels[:-1] != labels[1:]
        edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        out[edge] = 0.6 * out[edge] + 0.4 * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_png(rgb: np.ndarray, path: str) -> None:
    """Write an `(H, W, 3)` uint8 RGB array as a PNG file."""
    import cv2

    if not cv2.imwrite(path, np.ascontiguousarray(validate_image(rgb)[..., ::-1])):
        raise OSError(f"could not write PNG to {path}")
