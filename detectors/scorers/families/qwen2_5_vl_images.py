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

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from detectors.errors import InvalidImageError
from detectors.layout import ImageLayout
from detectors.scorers.fast import (
    PrefixCachedLM,
    Timings,
    check_targets,
    image_spans,
    run_timed,
    to_numpy,
)
from detectors.scorers.masked import MaskedBatch, fill_image
from detectors.scorers.tensor_masks import InputGeometry, label_shares
from detectors.scorers.vision import TorchVision, VisionRunner
from detectors.types import Fill, Target

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


class FastQwenImagesScorer:
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
        import torch

        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.image = np.asarray(image)
        if self.image.shape[:2] != layout.canvas_hw:
            raise InvalidImageError(
                f"the canvas has shape {self.image.shape}; the layout is for {layout.canvas_hw}"
            )
        self.qwen, self.layout, self.chunk_size = qwen, layout, chunk_size
        self.generated_ids = [int(i) for i in generated_ids]
        self.timings = Timings()
        model = qwen.model
        self.device = next(model.parameters()).device
        config = model.config.vision_config
        self.patch, self.temporal = int(config.patch_size), int(config.temporal_patch_size)
        bases, grid = self._processed(self.image)
        self.grid = grid.to(self.device)
        hws = [(int(g[1]) * self.patch, int(g[2]) * self.patch) for g in grid]
        runners: dict[tuple[int, int], VisionRunner] = {}
        if vision is not None:
            runners[tuple(getattr(vision, "input_hw", ()))] = vision
        for hw in hws:
            if hw not in runners:
                from detectors.scorers.families.qwen2_5_vl_vision import qwen_vision_module

                runners[hw] = TorchVision(qwen_vision_module(model, hw))
        self.images = [
            _Image(box=box, hw=hw, base=base, vision=runners[hw])
            for box, hw, base in zip(layout.boxes, hws, bases, strict=True)
        ]
        prompt_ids = qwen.prompt_ids(prompt, self.image, layout)
        spans = image_spans(prompt_ids, qwen.image_token_id, [qwen.image_tokens(h) for h in hws])
        full = torch.tensor([prompt_ids + self.generated_ids], device=self.device)
        positions, _ = model.model.get_rope_index(
            full, mm_token_type_ids=(full == qwen.image_token_id).int(), image_grid_thw=self.grid
        )
        self.lm = PrefixCachedLM(
            decoder=model.model.language_model,
            embed=model.get_input_embeddings(),
            lm_head=model.lm_head,
            prompt_ids=prompt_ids,
            generated_ids=self.generated_ids,
            image_start=spans[0][0],
            image_tokens=sum(n for _, n in spans),
            image_spans=spans,
            position_ids=positions,
            timings=self.timings,
        )
        self._partition: Any = None
        self._fills: dict[Fill, list[tuple[Any, Any]]] = {}

    def _processed(self, canvas: np.ndarray) -> tuple[list[Any], Any]:
        """Each image of `canvas` as the model's `(1, C, h, w)` input, and the grids."""
        import torch

        from detectors.scorers.families.qwen2_5_vl import unpatchify

        images = [np.ascontiguousarray(i) for i in self.layout.split(canvas)]
        pixels, grid = self.qwen.pixel_inputs(images)
        counts = [int(g.prod()) for g in grid]
        out = [
            unpatchify(p, (int(g[1]), int(g[2])), self.patch, self.qwen.merge, self.temporal).to(
                self.device, torch.float32
            )
            for p, g in zip(torch.split(pixels, counts), grid, strict=True)
        ]
        return out, grid

    @property
    def name(self) -> str:
        visions = "; ".join(sorted({i.vision.name for i in self.images}))
        lm = f"lm=torch:{self.device.type}"
        n = len(self.images)
        return f"qwen2.5-vl-fast({self.qwen.name}; {n} images; {visions}; {lm})"

    @property
    def max_batch_size(self) -> int:
        return self.chunk_size

    def _prepare(self, batch: MaskedBatch) -> Any:
        """The batch's kept-region matrix on the device, after readying each image's region
        shares (per partition) and fill (per fill)."""
        import torch

        if batch.image.shape != self.image.shape:
            raise InvalidImageError(
                f"the batch's image has shape {batch.image.shape}; this scorer was built for "
                f"{self.image.shape}"
            )
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

    def _features(self, keep: Any, fill: Fill) -> Any:
        """`(b, T, D)`: the masked images of `b` kept-region rows, encoded, concatenated."""
        import torch

        rows = keep.shape[0]
        out = []
        for part, (image, diff) in zip(self.images, self._fills[fill], strict=True):
            share = part.shares.kept(torch.index_select(keep, 1, part.ids))
            masked = torch.addcmul(image, share.view(rows, 1, *part.hw), diff)
            out.append(run_timed(self.timings, "vision", part.vision, masked))
        return torch.cat(out, dim=1)

    def score(self, batch: MaskedBatch, targets: Sequence[Target]) -> np.ndarray:
        import torch

        started = time.perf_counter()
        check_targets(targets, self.generated_ids)
        t = self.timings
        keep = run_timed(t, "masking", self._prepare, batch)
        out = []
        for i in range(0, batch.size, self.chunk_size):
            features = self._features(keep[i : i + self.chunk_size], batch.fill)
            out.append(run_timed(t, "language_model", self.lm.probs, features, targets))
        probs = to_numpy(torch.cat(out))
        t.calls += 1
        t.rows += batch.size
        t.total += time.perf_counter() - started
        return probs
