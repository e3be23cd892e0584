"""Reading and writing images at the edge (files <-> RGB uint8 arrays), and untrusted image
bytes: format sniffing from magic bytes, header sizes read without decoding, and a Pillow
opener that tries only PNG, JPEG and WebP.

    ImageRejectedError (guardrail.errors.PermanentError)  an image that cannot be accepted
    ├── UnsupportedImageFormatError  415  not PNG, JPEG or WebP (the detected format named)
    ├── ImageTooLargeError           413  more pixels than allowed (read from the header)
    ├── DegenerateImageError         422  too small, too thin, too few pixels for the regions
    ├── CorruptImageError            422  truncated or malformed data
    └── DecodeBusyError              503  no decode memory free in time (a RetryableError)
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from guardrail.errors import PermanentError, RetryableError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "ACCEPTED_FORMATS",
    "CorruptImageError",
    "DecodeBusyError",
    "DegenerateImageError",
    "ImageRejectedError",
    "ImageTooLargeError",
    "UnsupportedImageFormatError",
    "apply_orientation",
    "decode_image",
    "encode_png",
    "image_header",
    "load_pixels",
    "open_image",
    "orientation_of",
    "read_image",
    "resizable",
    "sniff_format",
    "to_rgb8",
    "write_image",
]

Format = Literal["PNG", "JPEG", "WEBP"]
ACCEPTED_FORMATS: tuple[Format, ...] = ("PNG", "JPEG", "WEBP")
_ACCEPTED_TEXT = "PNG, JPEG or WebP"


MAX_JPEG_SCANS = 100


class ImageRejectedError(PermanentError):
    """An image that cannot be accepted; `status` is the HTTP status that says why and
    `error_type` the error contract's kind."""

    status = 422
    error_type = "invalid_image"


class UnsupportedImageFormatError(ImageRejectedError):
    status = 415
    error_type = "unsupported_media_type"


class ImageTooLargeError(ImageRejectedError):
    status = 413
    error_type = "payload_too_large"


class DegenerateImageError(ImageRejectedError):
    pass


class CorruptImageError(ImageRejectedError):
    pass


class DecodeBusyError(ImageRejectedError, RetryableError):
    status = 503
    error_type = "ingest_busy"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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


def encode_png(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError("could not encode the image as PNG")
    return bytes(buffer)


# Formats recognised only to name them in the refusal: (prefix, offset, name).
_REFUSED: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"II+\x00", 0, "BigTIFF"),
    (b"MM\x00+", 0, "BigTIFF"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"\x00\x00\x02\x00", 0, "CUR (Windows cursor)"),
    (b"%!PS", 0, "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", 0, "EPS (binary)"),
    (b"%PDF", 0, "PDF"),
    (b"8BPS", 0, "PSD (Photoshop)"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"),
    (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", 0, "JPEG XL"),
    (b"\x8aMNG", 0, "MNG"),
    (b"qoif", 0, "QOI"),
    (b"DDS ", 0, "DDS"),
    (b"icns", 0, "ICNS"),
    (b"v/1\x01", 0, "OpenEXR"),
    (b"#?RADIANCE", 0, "Radiance HDR"),
    (b"#?RGBE", 0, "Radiance HDR"),
    (b"gimp xcf", 0, "XCF (GIMP)"),
    (b"SIMPLE  =", 0, "FITS"),
    (b"\xd7\xcd\xc6\x9a", 0, "WMF"),
    (b" EMF", 40, "EMF"),
    (b"\x1a\x45\xdf\xa3", 0, "WebM/Matroska video"),
    (b"PK\x03\x04", 0, "ZIP archive"),
    (b"\x1f\x8b", 0, "gzip data"),
    (b"iVBORw0KGgo", 0, "base64 text of a PNG (the image was encoded twice)"),
    (b"/9j/", 0, "base64 text of a JPEG (the image was encoded twice)"),
    (b"UklGR", 0, "base64 text of a RIFF/WebP file (the image was encoded twice)"),
    (b"data:", 0, "a data URL inside the image data"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def _refused_format(data: bytes) -> str | None:
    """The name of a recognised format that is not accepted, or None."""
    for prefix, offset, name in _REFUSED:
        if data[offset : offset + len(prefix)] == prefix:
            return name
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        return "HEIF/HEIC" if brand in _HEIF_BRANDS else "an ISO media file (MP4/MOV)"
    if data[:4] == b"RIFF":
        return f"RIFF {data[8:12].decode('latin-1').strip() or '?'}"
    if len(data) >= 3 and data[:1] == b"P" and data[1:2] in b"1234567" and data[2:3].isspace():
        return "PNM (PBM/PGM/PPM)"
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<svg", b"<?xml", b"<!doctype svg")) and b"<svg" in head:
        return "SVG"
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if head.startswith(b"<?xml"):
        return "XML"
    return None


def sniff_format(data: bytes) -> Format:
    """The format of `data` from its magic bytes: `"PNG"`, `"JPEG"` or `"WEBP"`.

    Raises:
        CorruptImageError: empty data.
        UnsupportedImageFormatError: any other format (named when recognised).
    """
    if not data:
        raise CorruptImageError("the image is empty")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    refused = _refused_format(data)
    if refused is not None:
        raise UnsupportedImageFormatError(
            f"the image is {refused}, which is not accepted; send {_ACCEPTED_TEXT}"
        )
    raise UnsupportedImageFormatError(
        f"the image format was not recognised from its first bytes; send {_ACCEPTED_TEXT}"
    )


def image_header(data: bytes, fmt: Format) -> tuple[int, int]:
    """`(width, height)` as stored in the header of a PNG, JPEG or WebP (before any EXIF
    rotation), without decoding any pixels.

    Raises:
        CorruptImageError: the header is missing, cut short or malformed.
    """
    size = {"PNG": _png_size, "JPEG": _jpeg_size, "WEBP": _webp_size}[fmt](data)
    if size is None or size[0] < 1 or size[1] < 1:
        raise CorruptImageError(f"the image is truncated or corrupt: no valid {fmt} header")
    if fmt == "JPEG":
        # every scan of a progressive JPEG re-walks the whole image: 10,000 scans in 650 KB
        # cost 38 s of CPU; 0xFFDA (start of scan) never occurs inside entropy-coded data
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise DegenerateImageError(
                f"the JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are accepted "
                "(a progressive JPEG has about 10)"
            )
    return size


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}  # frame headers (not DHT, JPG, DAC)


_JPEG_MAX_HEAD_MARKERS = 1_000  # real files have < 30 before the frame header
_JPEG_MAX_FILL = 1_024


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    # bounded walk: 16 MB of empty COM markers or of fill bytes took 4 s of Python per request
    i, n = 2, len(data)
    for _ in range(_JPEG_MAX_HEAD_MARKERS):
        if i >= n or data[i] != 0xFF:
            return None
        start = i
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
            if i - start > _JPEG_MAX_FILL:
                return None
        if i >= n:
            return None
        marker = data[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            continue
        if marker in (0xD9, 0xDA) or i + 2 > n:  # end of image or scan before any frame
            return None
        length = int.from_bytes(data[i : i + 2], "big")
        if length < 2:
            return None
        if marker in _SOF:
            if i + 7 > n:
                return None
            height = int.from_bytes(data[i + 3 : i + 5], "big")
            width = int.from_bytes(data[i + 5 : i + 7], "big")
            return width, height
        i += length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk, payload = data[12:16], data[20:30]
    if chunk == b"VP8 " and len(payload) >= 10 and payload[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", payload[6:10])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(payload) >= 5 and payload[0] == 0x2F:
        bits = int.from_bytes(payload[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(payload) >= 10:
        width = int.from_bytes(payload[4:7], "little") + 1
        height = int.from_bytes(payload[7:10], "little") + 1
        return width, height
    return None


def open_image(data: bytes, fmt: Format) -> Image.Image:
    """`data` opened lazily by Pillow's `fmt` plugin only (no other plugin is ever tried, so
    no GIF, TIFF, EPS/Ghostscript... code runs on it); pixels are decoded on `load()`.  Close
    it (or use it as a context manager).

    Raises:
        CorruptImageError: Pillow's plugin refuses the header.
    """
    from PIL import Image, UnidentifiedImageError

    if fmt not in ACCEPTED_FORMATS:
        raise UnsupportedImageFormatError(f"the image is {fmt}; send {_ACCEPTED_TEXT}")
    try:
        return Image.open(io.BytesIO(data), formats=[fmt])
    except UnidentifiedImageError:  # its message names a BytesIO object: say it plainly
        raise CorruptImageError(
            f"the image is truncated or not a valid {fmt} file (Pillow could not read its header)"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"the image has too many pixels: {exc}") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise CorruptImageError(f"the image is truncated or corrupt ({fmt}): {exc}") from None


def load_pixels(image: Image.Image) -> None:
    """Decode `image`'s pixels, turning decoder errors into `CorruptImageError`."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as exc:
        fmt = image.format or "image"
        raise CorruptImageError(f"the image is truncated or corrupt ({fmt}): {exc}") from None


_ORIENTATION = 0x0112


def orientation_of(image: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 when absent or unreadable)."""
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block is metadata only: the pixels are still good
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    """`image` turned upright for an EXIF `orientation` (the table of
    `PIL.ImageOps.exif_transpose`)."""
    from PIL import Image

    method = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)
    return image if method is None else image.transpose(method)


def resizable(image: Image.Image) -> Image.Image:
    """`image` in a mode Pillow resamples properly: palette images become RGB or RGBA
    (keeping transparency), bilevel ones L; other modes are left as they are."""
    if image.mode in ("P", "PA"):
        transparent = image.mode == "PA" or "transparency" in image.info
        return image.convert("RGBA" if transparent else "RGB")
    if image.mode == "1":
        return image.convert("L")
    if image.mode.startswith("I;16"):  # Pillow cannot reduce 16-bit modes: 0..1 floats
        from PIL import Image

        values = np.asarray(image).astype(np.float32) / 65535.0
        return Image.fromarray(values, mode="F")
    return image


def to_rgb8(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB: 16-bit and 32-bit integer samples scaled (never clipped), float
    samples read as 0..1 (or 0..255 when larger), alpha composited over white (as vLLM does),
    palette, grey, CMYK and YCbCr converted."""
    from PIL import Image

    image = resizable(image)
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        image = Image.fromarray(_grey8(image), mode="L")
        mode = "L"
    if mode in ("LA", "La", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def _grey8(image: Image.Image) -> np.ndarray:
    """`(H, W)` uint8 from a 16-bit, 32-bit integer or float grey image, scaled."""
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        wide = values.astype(np.uint32)
        return np.asarray((wide * 255 + 32767) // 65535, dtype=np.uint8)
    if image.mode == "I":  # 16-bit data opened as 32-bit: scale when it uses the range
        ints = np.clip(values, 0, 65535).astype(np.uint32)
        if ints.size and int(ints.max()) > 255:
            return np.asarray((ints * 255 + 32767) // 65535, dtype=np.uint8)
        return np.asarray(ints, dtype=np.uint8)
    floats = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    scale = 255.0 if floats.size and float(floats.max()) <= 1.0 else 1.0
    return np.asarray(np.clip(np.rint(floats * scale), 0, 255), dtype=np.uint8)


def decode_image(data: bytes, *, max_pixels: int = 40_000_000) -> np.ndarray:
    """PNG, JPEG or WebP bytes as an upright `(H, W, 3)` uint8 RGB array, at full size.

    The format is sniffed from the magic bytes and only its Pillow plugin is used; the size is
    read from the header and checked against `max_pixels` before anything is decoded; modes are
    normalised as by `to_rgb8` and the EXIF orientation applied.  Truncated files are refused,
    not half-decoded.

    Raises:
        ImageRejectedError (a ValueError): empty, another format, truncated or corrupt, or larger
            than `max_pixels`.
    """
    fmt = sniff_format(data)
    width, height = image_header(data, fmt)
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} pixels, over the {max_pixels} pixels allowed"
        )
    with open_image(data, fmt) as image:
        if image.size != (width, height):
            raise CorruptImageError(f"the image is corrupt: its {fmt} header disagrees with itself")
        load_pixels(image)
        orientation = orientation_of(image)  # after load: a PNG's getexif() decodes it
        rgb = apply_orientation(to_rgb8(image), orientation)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
