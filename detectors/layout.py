"""Several images audited as one: laid side by side on one canvas, partitioned image by image.

A model that takes several images in one prompt (Qwen2.5-VL) is audited with one search whose
regions span all of them.  The search, the partition, storage and heatmaps all work on one
`(H, W, 3)` image, so the images are laid out on one canvas (`side_by_side`: scaled to a common
height and placed left to right, so no pixel of the canvas belongs to no image), each image is
partitioned on its own and the label maps merged with offset ids (`layout_partition`: no region
straddles two images), and the scorers cut every masked canvas back into the separate images
(`ImageLayout.split`) and feed them to the model as the prompt's several images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detectors.errors import PartitionError
from detectors.regions import RegionPartition, slic_partition, validate_image

__all__ = ["ImageLayout", "layout_partition", "merge_partitions", "side_by_side"]

Box = tuple[int, int, int, int]  # (top, left, height, width) on the canvas


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageLayout:
    """Where each of several images lies on one canvas, in the order the prompt holds them.

    Attributes:
        canvas_hw: the canvas `(H, W)`.
        boxes: one `(top, left, height, width)` per image, inside the canvas, not overlapping.
    """

    canvas_hw: tuple[int, int]
    boxes: tuple[Box, ...]

    def __post_init__(self) -> None:
        height, width = self.canvas_hw
        if height < 1 or width < 1:
            raise ValueError(f"a canvas needs pixels, got canvas_hw={self.canvas_hw}")
        if not self.boxes:
            raise ValueError("a layout needs at least one image box")
        # box against box, not a count per canvas pixel: a stored layout is read back before
        # its canvas is, and its canvas_hw must not size an allocation
        for n, box in enumerate(self.boxes):
            top, left, h, w = box
            if h < 1 or w < 1 or top < 0 or left < 0 or top + h > height or left + w > width:
                raise ValueError(
                    f"image box {box} (top, left, height, width) is empty or outside the "
                    f"{height}x{width} canvas"
                )
            for t, x, bh, bw in self.boxes[:n]:
                if top < t + bh and t < top + h and left < x + bw and x < left + w:
                    raise ValueError(f"image boxes overlap: {self.boxes}")

    @classmethod
    def single(cls, hw: tuple[int, int]) -> ImageLayout:
        """One image filling its canvas."""
        return cls(canvas_hw=hw, boxes=((0, 0, hw[0], hw[1]),))

    @property
    def n_images(self) -> int:
        return len(self.boxes)

    @property
    def is_single(self) -> bool:
        """One image filling the whole canvas (what a plain one-image audit is)."""
        return self.boxes == ((0, 0, *self.canvas_hw),)

    def region_counts(self, n_regions: int) -> list[int]:
        """About `n_regions` regions shared out by the images' areas, at least 2 each (what
        `layout_partition` asks of each image)."""
        areas = [h * w for _, _, h, w in self.boxes]
        return [max(2, round(n_regions * a / sum(areas))) for a in areas]

    def split(self, canvas: np.ndarray) -> list[np.ndarray]:
        """The images of a `(..., H, W, C)` canvas (or a batch of them), as views, in order.

        Raises:
            ValueError: the canvas is not `canvas_hw`.
        """
        if tuple(canvas.shape[-3:-1]) != self.canvas_hw:
            raise ValueError(
                f"the canvas has shape {canvas.shape}; the layout is for {self.canvas_hw}"
            )
        return [canvas[..., t : t + h, x : x + w, :] for t, x, h, w in self.boxes]

    def images_of(self, labels: np.ndarray, regions: Sequence[int]) -> list[int]:
        """Which images (0-based, in prompt order) `regions` of the canvas's `(H, W)` label
        map lie in."""
        wanted = {int(r) for r in regions}
        return [
            n
            for n, (top, left, h, w) in enumerate(self.boxes)
            if wanted & set(np.unique(labels[top : top + h, left : left + w]).tolist())
        ]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form (`from_dict` reads it back)."""
        return {"canvas": list(self.canvas_hw), "boxes": [list(b) for b in self.boxes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageLayout:
        """The layout `as_dict` wrote.

        Raises:
            ValueError: not that shape.
        """
        try:
            canvas = tuple(int(v) for v in data["canvas"])
            boxes = tuple(tuple(int(v) for v in b) for b in data["boxes"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"not an image layout: {data!r:.200} ({exc})") from None
        if len(canvas) != 2 or any(len(b) != 4 for b in boxes):
            raise ValueError(f"not an image layout: {data!r:.200}")
        return cls(canvas_hw=(canvas[0], canvas[1]), boxes=boxes)  # type: ignore[arg-type]


def side_by_side(
    images: Sequence[np.ndarray], *, max_pixels: int | None = None
) -> tuple[np.ndarray, ImageLayout]:
    """`images` scaled to the tallest one's height (aspect ratio kept, widths rounded) and
    placed left to right: the canvas and its layout.  No canvas pixel is outside an image.
    With `max_pixels` the common height is lowered until the canvas holds at most that many
    pixels (e.g. the images' own pixels in all: the canvas is never larger than they are;
    exceeded only where even a height of 1 pixel is too wide).

    Raises:
        InvalidImageError: an image is not a non-empty `(H, W, 3)` uint8 array.
        ValueError: no images.
    """
    if not images:
        raise ValueError("side_by_side needs at least one image")
    import cv2

    height = max(int(validate_image(i).shape[0]) for i in images)
    shapes = [(int(i.shape[0]), int(i.shape[1])) for i in images]

    def widths(at: int) -> list[int]:
        return [w if h == at else max(1, round(w * at / h)) for h, w in shapes]

    if max_pixels is not None:
        widths_per_row = sum(w / h for h, w in shapes)
        height = max(1, min(height, int((max_pixels / widths_per_row) ** 0.5)))
        while height > 1 and height * sum(widths(height)) > max_pixels:
            height -= 1  # the widths were rounded up past the bound
    tiles = []
    for image, width in zip(images, widths(height), strict=True):
        h = image.shape[0]
        if h == height:
            tiles.append(np.ascontiguousarray(image))
            continue
        shrink = height < h  # area averaging when shrinking, as the processors' resamplers do
        how = cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
        tiles.append(np.asarray(cv2.resize(image, (width, height), interpolation=how)))
    boxes: list[Box] = []
    left = 0
    for tile in tiles:
        boxes.append((0, left, height, int(tile.shape[1])))
        left += int(tile.shape[1])
    canvas = np.concatenate(tiles, axis=1)
    return canvas, ImageLayout(canvas_hw=(height, left), boxes=tuple(boxes))


def merge_partitions(layout: ImageLayout, partitions: Sequence[RegionPartition]) -> RegionPartition:
    """One partition of the canvas from one partition per image: image i's region ids are
    offset by the regions of the images before it.  Canvas pixels outside every image (none
    in a `side_by_side` layout) join the last image's last region.

    Raises:
        PartitionError: not one partition per image, or one of another image's size.
    """
    if len(partitions) != layout.n_images:
        raise PartitionError(
            f"{len(partitions)} partitions for a layout of {layout.n_images} images"
        )
    labels = np.full(layout.canvas_hw, -1, dtype=np.int32)
    offset = 0
    for (top, left, h, w), part in zip(layout.boxes, partitions, strict=True):
        if part.shape != (h, w):
            raise PartitionError(f"a partition of shape {part.shape} for an image of {(h, w)}")
        labels[top : top + h, left : left + w] = part.labels + offset
        offset += part.n_regions
    labels[labels < 0] = offset - 1
    # short (stored in 64 characters): the first image's method and the count
    kind = partitions[0].method.split("(")[0]
    return RegionPartition(labels, f"per-image({kind},images={len(partitions)},n={offset})")


def layout_partition(canvas: np.ndarray, layout: ImageLayout, n_regions: int) -> RegionPartition:
    """SLICO superpixels image by image (`slic_partition`), merged into one partition of the
    canvas: about `n_regions` in all, shared out by the images' areas (at least 2 each).

    Raises:
        ImageGeometryError: an image too small or too thin for its share of the regions.
    """
    if layout.is_single:
        return slic_partition(canvas, n_regions)
    crops = layout.split(validate_image(canvas))
    counts = layout.region_counts(n_regions)
    parts = [slic_partition(np.ascontiguousarray(c), n) for c, n in zip(crops, counts, strict=True)]
    return merge_partitions(layout, parts)
