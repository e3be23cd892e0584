"""Qwen2.5-VL's fast scorer for several images in one prompt.

The sample is a canvas of images (`detectors.layout`) and a partition of the canvas.  Each image
is preprocessed once (and its fill image once per fill), masked in tensor space on its own input
grid with the share of its pixels that the kept regions hold, and encoded by the vision tower at
its own geometry (ONNX Runtime where a vision file serves that size, torch otherwise); the
features of all images go into their runs of image tokens, in prompt order, and the language
model runs with the text before the first image cached and the 3-D rope positions of the whole
prompt computed once, as for one image (`detectors.scorers.fast`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from detectors.errors import InvalidImageError
from detectors.layout import ImageLayout
from detectors.scorers.families.scorers import fast_scorer_name
from detectors.scorers.fast import ChunkedScorer, PrefixCachedLM, image_spans, run_timed
from detectors.scorers.masked import MaskedBatch, fill_image
from detectors.scorers.tensor_masks import InputGeometry, label_shares
from detectors.scorers.vision import VisionRunner
from detectors.types import Fill

if TYPE_CHECKING:
    from detectors.scorers.families.qwen2_5_vl import QwenModel

__all__ = ["FastQwenImagesScorer"]


@dataclass(eq=False)
class _Image:
    """One image of the canvas: its box, processed input size, preprocessed pixels
    `(1, C, h, w)`, vision runner, and (per partition) its regions' shares."""

    box: tuple[int, int, int, int]
    hw: tuple[int, int]
    base: Any
    vision: VisionRunner
    ids: Any = None  # (r,) int64: the partition's region ids present in this image
    shares: Any = None  # RegionShares of those ids on this image's input grid


class FastQwenImagesScorer(ChunkedScorer):
    """Tensor-space masks for a canvas of several images fed to Qwen2.5-VL as the prompt's
    several images (one `<|image_pad|>` per image of `layout`, in its order).

    Args:
        qwen: the loaded model.
        image: the canvas, `layout.canvas_hw`.
        prompt: the prompt with one image placeholder per image.
        generated_ids: the tokens the model generated.
        layout: where each image lies on the canvas.
        vision: an `OnnxVision` for one input size, used for the images processed to that
            size (the torch tower encodes the others), or None for the torch tower.
        chunk_size: masked canvases per forward.

    Raises:
        InvalidImageError: the canvas is not the layout's size.
        ImageTokenError: the prompt does not hold one placeholder per image.
    """

    def __init__(
        self,
        qwen: QwenModel,
        image: np.ndarray,
        prompt: str,
        generated_ids: Sequence[int],
        *,
        layout: ImageLayout,
        vision: VisionRunner | None = None,
        chunk_size: int = 16,
    ) -> None:
        self._setup(image, generated_ids, chunk_size)
        if self.image.shape[:2] != layout.canvas_hw:
            raise InvalidImageError(
                f"the canvas has shape {self.image.shape}; the layout is for {layout.canvas_hw}"
            )
        self.qwen, self.layout = qwen, layout
        self.device = next(qwen.model.parameters()).device
        bases, grid = self._processed(self.image)
        grid = grid.to(self.device)
        hws = [(int(b.shape[-2]), int(b.shape[-1])) for b in bases]
        runners: dict[tuple[int, int], VisionRunner] = {}
        if vision is not None:
            runners[tuple(getattr(vision, "input_hw", ()))] = vision
        for hw in hws:
            if hw not in runners:
                runners[hw] = qwen.torch_vision(hw)
        self.images = [
            _Image(box=box, hw=hw, base=base, vision=runners[hw])
            for box, hw, base in zip(layout.boxes, hws, bases, strict=True)
        ]
        prompt_ids = qwen.prompt_ids(prompt, self.image, layout)
        spans = image_spans(prompt_ids, qwen.image_token_id, [qwen.image_tokens(h) for h in hws])
        self.lm = PrefixCachedLM.for_model(
            qwen.model,
            prompt_ids=prompt_ids,
            generated_ids=self.generated_ids,
            spans=spans,
            position_ids=qwen.rope_positions(prompt_ids + self.generated_ids, grid),
            timings=self.timings,
        )
        self._partition: Any = None
        self._fills: dict[Fill, list[tuple[Any, Any]]] = {}

    def _processed(self, canvas: np.ndarray) -> tuple[list[Any], Any]:
        """Each image of `canvas` as the model's `(1, C, h, w)` input, and the grids."""
        images = [np.ascontiguousarray(i) for i in self.layout.split(canvas)]
        return self.qwen.processed(images, self.device)

    @property
    def name(self) -> str:
        visions = "; ".join(sorted({i.vision.name for i in self.images}))
        parts = [f"{len(self.images)} images", visions]
        return fast_scorer_name("qwen2.5-vl", self.qwen.name, parts, self.device)

    def _prepare_masks(self, batch: MaskedBatch) -> Any:
        """The batch's kept-region matrix on the device, after readying each image's region
        shares (per partition) and fill (per fill)."""
        import torch

        self._check_image(batch)
        if batch.partition is not self._partition:
            for part in self.images:
                top, left, h, w = part.box
                crop = batch.partition.labels[top : top + h, left : left + w]
                ids = np.unique(crop)
                local = np.searchsorted(ids, crop).astype(np.int64)
                geometry = InputGeometry.resize_to(part.hw)
                part.shares = label_shares(local, len(ids), geometry, self.device)
                part.ids = torch.from_numpy(ids.astype(np.int64)).to(self.device)
            self._partition = batch.partition
        if batch.fill not in self._fills:
            fills, _ = self._processed(fill_image(self.image, batch.fill))
            self._fills[batch.fill] = [
                (fill, part.base - fill) for part, fill in zip(self.images, fills, strict=True)
            ]
        return torch.from_numpy(batch.keep.astype(np.float32)).to(self.device)

    def _chunk_features(self, keep: Any, fill: Fill) -> Any:
        """`(b, T, D)`: the masked images of `b` kept-region rows, encoded, concatenated."""
        import torch

        rows = keep.shape[0]
        out = []
        for part, (image, diff) in zip(self.images, self._fills[fill], strict=True):
            share = part.shares.kept(torch.index_select(keep, 1, part.ids))
            masked = torch.addcmul(image, share.view(rows, 1, *part.hw), diff)
            out.append(run_timed(self.timings, "vision", part.vision, masked))
        return torch.cat(out, dim=1)
