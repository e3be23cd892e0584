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


def decode_image(data: bytes, *, max_pixels: int = 40_000_000) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, WebP, ...) as an `(H, W, 3)` uint8 RGB array.

    The size is read from the header and checked against `max_pixels` before anything is
    decoded (decompression bombs); truncated files are refused, not half-decoded.

    Raises:
        ValueError: empty, not an image, truncated, or larger than `max_pixels`.
    """
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ValueError(
                        f"the image is {width}x{height} pixels, over the {max_pixels} allowed"
                    )
                image.load()
                rgb = image.convert("RGB")
    except ValueError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"the image has too many pixels (decompression bomb?): {exc}") from None
    except UnidentifiedImageError:
        raise ValueError("the image could not be decoded (send PNG, JPEG or WebP)") from None
    except (OSError, SyntaxError) as exc:  # truncated or corrupt data
        raise ValueError(f"the image is truncated or corrupt: {exc}") from None
    if width == 0 or height == 0:
        raise ValueError("the image has no pixels")
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def encode_png(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError("could not encode the image as PNG")
    return bytes(buffer)
