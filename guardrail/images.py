"""Reading and writing images at the edge (files <-> RGB uint8 arrays)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["read_image", "write_image"]


def read_image(path: str | Path) -> np.ndarray:
    """An image file as an `(H, W, 3)` uint8 RGB array.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an image OpenCV can read.
    """
    import cv2

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no image file at {str(file)!r}")
    data = cv2.imread(str(file), cv2.IMREAD_COLOR)
    if data is None:
        raise ValueError(f"{str(file)!r} is not an image file (PNG, JPEG, ...)")
    return np.ascontiguousarray(data[..., ::-1])


def write_image(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB array as PNG (or whatever the suffix says)."""
    import cv2

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"could not write {str(path)!r}")
