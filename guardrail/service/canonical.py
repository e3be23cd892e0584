"""Canonical images: what ingest stores and queues instead of the bytes a client sent.

An image is accepted only as PNG, JPEG or WebP (sniffed from its magic bytes, opened by that
Pillow plugin alone); its size is read from the header and checked before any pixel is decoded;
its geometry is checked at the audit resolution (short side, aspect ratio, enough pixels for the
model's regions); it is decoded under a per-process pixel budget (large JPEGs at a reduced
scale), normalised to upright 8-bit RGB, downscaled to the model's own input size and stored as
a lossless PNG.  Workers, partitions, stored images and report heatmaps then never see more
pixels than the model does.

The audit resolution is read from the checkpoint's processor config JSON (never by loading the
model): CLIP-style `size.shortest_edge` caps the shortest side, Qwen2-VL-style `max_pixels` (or
`size.longest_edge`, a pixel count there) caps the total pixels; `ModelSettings.audit_
shortest_edge` / `audit_max_pixels` override it.  Images are never upscaled.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detectors.errors import ImageGeometryError
from detectors.regions import slic_region_side
from guardrail.service.images import (
    CorruptImageError,
    DecodeBusyError,
    DegenerateImageError,
    Format,
    ImageTooLargeError,
    apply_orientation,
    encode_png,
    image_header,
    load_pixels,
    open_image,
    orientation_of,
    resizable,
    sniff_format,
    to_rgb8,
)

if TYPE_CHECKING:
    from detectors.layout import ImageLayout
    from guardrail.config import ModelSettings

__all__ = [
    "FALLBACK_MAX_PIXELS",
    "AuditResolution",
    "CanonicalImage",
    "ImageLimits",
    "PixelBudget",
    "audit_resolution",
    "canonical_canvas",
    "canonical_image",
    "decode_canvas",
    "decode_for_audit",
    "decode_scaled",
    "pixel_budget",
    "read_audit_resolution",
]

FALLBACK_MAX_PIXELS = 1024 * 1024  # when a checkpoint's processor config gives no size
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, CLIP's and Qwen2-VL's default
_PILLOW_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: beyond it Pillow warns
_TRIM_AFTER_PIXELS = 4_000_000


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditResolution:
    """How far ingest downscales an image (every bound that is set holds; never upscaled).

    Attributes:
        shortest_edge: the shortest side at most this many pixels (CLIP-style processors).
        longest_edge: the longest side at most this many pixels.
        max_pixels: at most this many pixels in all (Qwen2-VL-style processors).
        resample: the PIL resampling filter (the processor's own).
        source: where the numbers came from, for logs and docs.
    """

    shortest_edge: int | None = None
    longest_edge: int | None = None
    max_pixels: int | None = None
    resample: int = _BICUBIC
    source: str = "settings"

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """`(width, height)` after downscaling (the size itself when within every bound)."""
        short, long = min(width, height), max(width, height)
        scale, new_short, new_long = 1.0, short, long
        if self.shortest_edge is not None and self.shortest_edge / short < scale:
            # exactly as CLIP's processor sizes it
            scale = self.shortest_edge / short
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        if self.longest_edge is not None and self.longest_edge / long < scale:
            scale = self.longest_edge / long
            new_short, new_long = max(1, int(self.longest_edge * short / long)), self.longest_edge
        if self.max_pixels is not None and width * height > self.max_pixels:
            by_pixels = math.sqrt(self.max_pixels / (width * height))
            if by_pixels < scale:
                new_short, new_long = max(1, int(short * by_pixels)), max(1, int(long * by_pixels))
                while new_short * new_long > self.max_pixels and new_long > 1:
                    new_long -= 1  # float rounding: stay under the bound
        return (new_short, new_long) if width <= height else (new_long, new_short)


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _from_processor(config: Mapping[str, Any], source: str) -> AuditResolution | None:
    resample = config.get("resample")
    resample = resample if isinstance(resample, int) and 0 <= resample <= 5 else _BICUBIC
    if config.get("do_resize") is False:
        return None
    raw_size = config.get("size")
    size: Mapping[str, Any] = raw_size if isinstance(raw_size, dict) else {}
    kind = str(config.get("image_processor_type", "")).lower()
    qwen_style = "qwen" in kind or any(
        k in config for k in ("max_pixels", "merge_size", "temporal_patch_size")
    )
    if qwen_style:  # sizes are pixel counts: size.longest_edge is max_pixels
        if max_pixels := _positive_int(config.get("max_pixels")):
            return AuditResolution(
                max_pixels=max_pixels, resample=resample, source=f"{source}: max_pixels"
            )
        if max_pixels := _positive_int(size.get("longest_edge")):
            return AuditResolution(
                max_pixels=max_pixels,
                resample=resample,
                source=f"{source}: size.longest_edge (pixels)",
            )
        return None
    shortest = _positive_int(size.get("shortest_edge"))
    longest = _positive_int(size.get("longest_edge"))
    if shortest or longest:
        return AuditResolution(
            shortest_edge=shortest,
            longest_edge=longest,
            resample=resample,
            source=f"{source}: size.shortest_edge/longest_edge",
        )
    height, width = _positive_int(size.get("height")), _positive_int(size.get("width"))
    if height and width:  # a fixed input size: keep both sides at least that long
        return AuditResolution(
            shortest_edge=max(height, width),
            resample=resample,
            source=f"{source}: size.height/width",
        )
    return None


def read_audit_resolution(path: str | Path) -> AuditResolution | None:
    """The input size a checkpoint's image processor resizes to, from
    `preprocessor_config.json` or `processor_config.json` (its `image_processor` part) in
    `path`; None when neither says.  Reads JSON only: no model, torch or transformers."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        file = Path(path) / name
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(raw, dict):
            continue
        config = raw.get("image_processor", raw)
        if isinstance(config, dict) and (found := _from_processor(config, name)):
            return found
    return None


@functools.lru_cache(maxsize=64)
def _resolution(path: str, shortest_edge: int | None, max_pixels: int | None) -> AuditResolution:
    found = read_audit_resolution(path)
    if shortest_edge is not None or max_pixels is not None:
        resample = found.resample if found else _BICUBIC
        return AuditResolution(
            shortest_edge=shortest_edge,
            max_pixels=max_pixels,
            resample=resample,
            source="settings: audit_shortest_edge/audit_max_pixels",
        )
    if found is not None:
        return found
    return AuditResolution(
        max_pixels=FALLBACK_MAX_PIXELS,
        source=f"default: no image size in the processor config of {path}",
    )


def audit_resolution(model: ModelSettings) -> AuditResolution:
    """The audit resolution of a configured model (`ModelSettings`): its overrides, else its
    checkpoint's processor config, else at most `FALLBACK_MAX_PIXELS` pixels."""
    return _resolution(str(model.path), model.audit_shortest_edge, model.audit_max_pixels)


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageLimits:
    """What ingest accepts: `max_pixels` in the original (from its header), `max_aspect_ratio`
    (long over short side) and `min_side` at the audit resolution."""

    max_pixels: int
    min_side: int
    max_aspect_ratio: float

    def check(self, width: int, height: int, target: tuple[int, int], n_regions: int) -> None:
        """Raise `ImageTooLargeError` or `DegenerateImageError` for an original of `width` x
        `height` pixels audited at `target` with `n_regions` regions."""
        if width * height > self.max_pixels:
            raise ImageTooLargeError(
                f"the image is {width}x{height} pixels ({width * height} pixels), over the "
                f"{self.max_pixels} pixels allowed (max_image_pixels)"
            )
        ratio = max(width, height) / min(width, height)
        if ratio > self.max_aspect_ratio:
            raise DegenerateImageError(
                f"the image is {width}x{height} pixels, an aspect ratio of {ratio:.1f}:1; at "
                f"most {self.max_aspect_ratio:g}:1 is accepted (max_image_aspect_ratio)"
            )
        tw, th = target
        where = "" if target == (width, height) else f" at the audit resolution of {tw}x{th}"
        if min(tw, th) < self.min_side:
            raise DegenerateImageError(
                f"the image is {width}x{height} pixels{where}; its short side must be at "
                f"least {self.min_side} pixels (min_image_side)"
            )
        try:
            slic_region_side(th, tw, n_regions)
        except ImageGeometryError as exc:
            raise DegenerateImageError(
                f"the image{where or f' of {width}x{height} pixels'} cannot be split into the "
                f"{n_regions} regions its audit needs (n_regions): {exc}"
            ) from None


class PixelBudget:
    """Decoded pixels in flight across the threads of one process: a decode waits until its
    pixels fit (an image larger than the whole budget waits to decode alone)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a pixel budget must be positive, got: {capacity}")
        self.capacity = capacity
        self._in_use = 0
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        return self._in_use

    @contextmanager
    def hold(self, pixels: int, *, timeout: float) -> Iterator[None]:
        """Hold `pixels` of the budget for the block.

        Raises:
            DecodeBusyError: not free within `timeout` seconds.
        """
        need = max(1, min(pixels, self.capacity))
        with self._changed:
            if not self._changed.wait_for(
                lambda: self._in_use + need <= self.capacity, timeout=timeout
            ):
                raise DecodeBusyError(
                    f"the service is decoding other images ({self._in_use} of "
                    f"{self.capacity} pixels in use) and could not start on this one "
                    f"({pixels} pixels) within {timeout:g} s; retry later",
                    retry_after=max(1, math.ceil(timeout)),
                )
            self._in_use += need
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= need
                self._changed.notify_all()


_BUDGETS: dict[int, PixelBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def pixel_budget(capacity: int) -> PixelBudget:
    """The process-wide budget of `capacity` pixels (memory is a per-process resource, so
    every runtime in a process with the same setting shares one)."""
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(capacity)
        if budget is None:
            budget = _BUDGETS[capacity] = PixelBudget(capacity)
        return budget


@dataclass(frozen=True, kw_only=True, slots=True)
class CanonicalImage:
    """An accepted image as stored and queued: upright 8-bit RGB, at most the audit resolution.

    Attributes:
        png: the canonical image, lossless PNG without metadata.
        width, height: its size.
        original_width, original_height: the size of the image as sent, upright.
        original_format: `"PNG"`, `"JPEG"` or `"WEBP"`.
    """

    png: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    original_format: Format


def canonical_image(
    data: bytes,
    *,
    limits: ImageLimits,
    resolution: AuditResolution,
    n_regions: int,
    budget: PixelBudget | None,
    wait_seconds: float,
) -> CanonicalImage:
    """The canonical image of `data` (see the module docstring for each step), decoded under
    `budget` (None: the caller holds it).

    Raises:
        UnsupportedImageFormatError (415): not PNG, JPEG or WebP.
        ImageTooLargeError (413): more pixels than `limits.max_pixels`, from the header.
        DegenerateImageError (422): too thin, too small, or too few pixels for `n_regions`.
        CorruptImageError (422): truncated or malformed.
        DecodeBusyError (503): no decode budget within `wait_seconds`.
    """
    fmt = sniff_format(data)
    width, height = image_header(data, fmt)
    target = resolution.target_size(width, height)
    limits.check(width, height, target, n_regions)
    rgb, orientation = _decode_to(
        data, fmt, (width, height), target, resolution.resample, budget, wait_seconds
    )
    upright = orientation in (5, 6, 7, 8)
    return CanonicalImage(
        png=encode_png(rgb),
        width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
        original_width=height if upright else width,
        original_height=width if upright else height,
        original_format=fmt,
    )


def canonical_canvas(
    images: Sequence[CanonicalImage],
    *,
    min_side: int,
    n_regions: int,
    max_pixels: int | None = None,
) -> tuple[CanonicalImage, ImageLayout]:
    """Several canonical images as one canonical canvas, side by side at a common height
    (`detectors.layout.side_by_side`), never more pixels than the images hold in all nor than
    `max_pixels` (a sample's bound, whatever its image count: a worker decodes the canvas
    whole), and its layout.  The canvas's "original" size is its own; its format that of the
    first image.

    Raises:
        DegenerateImageError (422): an image too small on the canvas for `min_side` or for its
            share of `n_regions`.
    """
    import cv2

    from detectors.layout import side_by_side

    pixels = []
    for image in images:
        buffer = np.frombuffer(image.png, dtype=np.uint8)
        bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        if bgr is None:
            raise CorruptImageError("a canonical image is not a readable PNG")
        pixels.append(np.ascontiguousarray(bgr[..., ::-1]))
    total = sum(i.width * i.height for i in images)
    bound = total if max_pixels is None else min(total, max_pixels)
    canvas, layout = side_by_side(pixels, max_pixels=bound)
    counts = layout.region_counts(n_regions)
    for n, ((_, _, h, w), share) in enumerate(zip(layout.boxes, counts, strict=True), start=1):
        try:
            if min(h, w) < min_side:
                raise ImageGeometryError(f"its short side must be at least {min_side} pixels")
            slic_region_side(h, w, share)
        except ImageGeometryError as exc:
            raise DegenerateImageError(
                f"image {n} of {len(images)} is {w}x{h} pixels beside the others, too small to "
                f"be audited with them: {exc}"
            ) from None
    height, width = int(canvas.shape[0]), int(canvas.shape[1])
    image = CanonicalImage(
        png=encode_png(canvas),
        width=width,
        height=height,
        original_width=width,
        original_height=height,
        original_format=images[0].original_format,
    )
    return image, layout


def decode_scaled(data: bytes, *, max_side: int, max_pixels: int) -> np.ndarray:
    """PNG, JPEG or WebP bytes as an upright `(H, W, 3)` uint8 RGB array whose longest side
    is at most `max_side` (downscaled while decoding: large JPEGs at a reduced scale; never
    upscaled).  For images stored before ingest made them canonical (report heatmaps).

    Raises:
        ImageRejectedError: another format, over `max_pixels`, truncated or corrupt.
    """
    fmt = sniff_format(data)
    width, height = image_header(data, fmt)
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} pixels, over the {max_pixels} pixels allowed"
        )
    target = AuditResolution(longest_edge=max_side).target_size(width, height)
    rgb, _ = _decode_to(data, fmt, (width, height), target, _BICUBIC, None, 0.0)
    return rgb


def decode_for_audit(data: bytes, model: ModelSettings) -> np.ndarray:
    """A job's image as the `(H, W, 3)` uint8 RGB array to audit: the canonical image as
    stored, or, for a job queued before ingest made images canonical, the image downscaled to
    `model`'s audit resolution while decoding.

    Raises:
        ImageRejectedError: another format, over Pillow's own pixel limit, truncated or
            corrupt.
    """
    fmt = sniff_format(data)
    width, height = image_header(data, fmt)
    if width * height > _PILLOW_MAX_PIXELS:
        raise ImageTooLargeError(
            f"the image is {width}x{height} pixels, over the {_PILLOW_MAX_PIXELS} pixels allowed"
        )
    resolution = audit_resolution(model)
    target = resolution.target_size(width, height)
    rgb, _ = _decode_to(data, fmt, (width, height), target, resolution.resample, None, 0.0)
    return rgb


def decode_canvas(data: bytes, layout: Mapping[str, Any]) -> tuple[np.ndarray, ImageLayout]:
    """A job's canvas of several images (`canonical_canvas`) as stored, and its layout.

    Raises:
        ImageRejectedError: not a PNG/JPEG/WebP under Pillow's pixel limit, truncated or
            corrupt, not the size its layout says, or a malformed layout (permanent: a
            worker does not retry it).
    """
    from detectors.layout import ImageLayout

    try:
        where = ImageLayout.from_dict(layout)
    except (ValueError, TypeError) as exc:
        raise CorruptImageError(f"the stored image layout is unreadable: {exc}") from None
    fmt = sniff_format(data)
    width, height = image_header(data, fmt)
    if (height, width) != where.canvas_hw:
        raise CorruptImageError(
            f"the stored canvas is {width}x{height} pixels; its layout says "
            f"{where.canvas_hw[1]}x{where.canvas_hw[0]}"
        )
    rgb, _ = _decode_to(data, fmt, (width, height), (width, height), _BICUBIC, None, 0.0)
    return rgb, where


def _decode_to(
    data: bytes,
    fmt: Format,
    size: tuple[int, int],
    target: tuple[int, int],
    resample: int,
    budget: PixelBudget | None,
    wait_seconds: float,
) -> tuple[np.ndarray, int]:
    """Decode `data` (header size `size`) straight to `target` (before orientation), as
    upright 8-bit RGB; returns it with the EXIF orientation that was applied."""
    with open_image(data, fmt) as image:
        if image.size != size:
            raise CorruptImageError(f"the image is corrupt: its {fmt} header disagrees with itself")
        if fmt == "JPEG" and target != size:
            image.draft(None, target)  # decode at 1/2, 1/4 or 1/8 scale, still >= target
        decoded = image.size[0] * image.size[1]
        if fmt == "JPEG" and image.info.get("progressive"):
            # libjpeg keeps every DCT coefficient of a progressive JPEG at full size whatever
            # the draft scale (2 bytes per sample): a 330 KB 6320x6320 file held 250 MB and
            # 7 s of CPU although drafted to 790x790; budget it at full size
            decoded = max(decoded, 2 * size[0] * size[1])
        with budget.hold(decoded, timeout=wait_seconds) if budget else nullcontext():
            try:
                load_pixels(image)
                orientation = orientation_of(image)  # after load: a PNG's getexif() decodes it
                small = resizable(image)
                if small.size != target:
                    small = small.resize(target, resample=resample, reducing_gap=3.0)
                rgb = np.asarray(apply_orientation(to_rgb8(small), orientation), dtype=np.uint8)
            finally:
                image.close()  # free the full-size pixels before the budget is released
            if decoded >= _TRIM_AFTER_PIXELS:
                _return_freed_memory()
    return np.ascontiguousarray(rgb), orientation


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim  # glibc only (not musl)
    except (OSError, AttributeError):
        return None
    return trim


def _return_freed_memory() -> None:
    """Give the freed pixels of a large decode back to the OS.  glibc keeps freed memory in
    the arena of the thread that freed it, one arena per ingest thread, so without this eight
    threads decoding 40 Mpx images in turn held 2.2 GB although the pixel budget let one
    decode at a time (370 MB with it)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
