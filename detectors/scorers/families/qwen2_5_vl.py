"""The Qwen2.5-VL family (`Qwen2_5_VLForConditionalGeneration`): loading, scorers, ONNX vision.

Qwen's processor class needs torchvision, which the project does not install: the image
processor (`Qwen2VLImageProcessorPil`) and the tokenizer are loaded on their own and the
`<|image_pad|>` placeholder is expanded here (grid_t * grid_h * grid_w / merge^2 tokens).
Pixel values are pre-patchified `(patches, C * T * P * P)` and concatenated across images, so a
batch of masked variants is the concatenation of their patches with `image_grid_thw` repeated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detectors.errors import ImageTokenError, InvalidImageError
from detectors.layout import ImageLayout
from detectors.scorers.families.base import (
    Checkpoint,
    Generation,
    ScorerFactories,
    VisionFiles,
)
from detectors.scorers.families.scorers import FastScorer, PlainScorer
from detectors.scorers.fast import PrefixCachedLM, image_span
from detectors.scorers.loading import load_pretrained, load_processors
from detectors.scorers.masked import MaskedBatch
from detectors.scorers.tensor_masks import InputGeometry
from detectors.scorers.vision import (
    OnnxMismatchError,
    OnnxVision,
    TorchVision,
    VisionRunner,
    VisionSpec,
    vision_config_dict,
    weights_fingerprint,
)

# a caption request in Qwen2.5-VL's chat format, for `guardrail explain` without --prompt
CAPTION_PROMPT_QWEN = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image."
    "<|im_end|>\n<|im_start|>assistant\n"
)

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"

__all__ = [
    "CAPTION_PROMPT_QWEN",
    "QWEN2_5_VL",
    "FastQwenScorer",
    "QwenFamily",
    "QwenModel",
    "QwenScorer",
    "load_qwen",
    "onnx_input_hw",
    "patchify",
    "qwen_onnx_vision",
    "qwen_onnx_visions",
    "unpatchify",
]


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class QwenModel(Checkpoint):
    """A loaded Qwen2.5-VL checkpoint: model, image processor, tokenizer, where it came from."""

    family = "qwen2_5_vl"
    image_processor: Any
    tokenizer: Any

    @property
    def merge(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def pixel_inputs(self, images: Sequence[np.ndarray]) -> tuple[Any, Any]:
        """`(pixel_values (patches, dim), image_grid_thw (n, 3))` from the image processor."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def processed(self, images: Sequence[np.ndarray], device: Any) -> tuple[list[Any], Any]:
        """Each image as the vision tower's `(1, C, h, w)` float32 input on `device` (the image
        processor's pixels, unpatchified), and the `(n, 3)` grids."""
        import torch

        pixels, grid = self.pixel_inputs(images)
        vision = self.model.config.vision_config
        patch, temporal = int(vision.patch_size), int(vision.temporal_patch_size)
        counts = [int(g.prod()) for g in grid]
        out = [
            unpatchify(p, (int(g[1]), int(g[2])), patch, self.merge, temporal).to(
                device, torch.float32
            )
            for p, g in zip(torch.split(pixels, counts), grid, strict=True)
        ]
        return out, grid

    def rope_positions(self, ids: Sequence[int], grid: Any) -> Any:
        """The 3-D rope positions `(3, 1, L)` of the whole prompt + generation `ids`, for
        images of `grid` (on its device)."""
        import torch

        full = torch.tensor([list(ids)], device=grid.device)
        types = (full == self.image_token_id).int()
        positions, _ = self.model.model.get_rope_index(
            full, mm_token_type_ids=types, image_grid_thw=grid
        )
        return positions

    def torch_vision(self, input_hw: tuple[int, int]) -> TorchVision:
        """The vision tower + merger in torch, batched at `input_hw`."""
        from detectors.scorers.families.qwen2_5_vl_vision import qwen_vision_module

        return TorchVision(qwen_vision_module(self.model, input_hw))

    def input_hw(self, image: np.ndarray) -> tuple[int, int]:
        """The `(H, W)` pixels the image processor resizes `image` to (multiples of 28),
        worked out with the processor's own rule, without preprocessing the pixels."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        proc = self.image_processor
        height, width = int(image.shape[0]), int(image.shape[1])
        if not getattr(proc, "do_resize", True):
            return height, width
        size = dict(proc.size or {})
        factor = int(proc.patch_size) * int(proc.merge_size)
        low = int(size.get("shortest_edge") or proc.min_pixels)
        high = int(size.get("longest_edge") or proc.max_pixels)
        h, w = smart_resize(height, width, factor, min_pixels=low, max_pixels=high)
        return int(h), int(w)

    def vision_spec(self, input_hw: tuple[int, int]) -> VisionSpec:
        """The vision tower + merger for images processed to `input_hw`, for `export_vision`
        and `OnnxVision` (one exported file serves one input geometry)."""
        from detectors.scorers.families.qwen2_5_vl_vision import qwen_vision_module

        vision = self.model.config.vision_config
        patch = int(vision.patch_size)

        def pixels(images: Sequence[np.ndarray]) -> Any:
            """Real images resized to `input_hw`, then normalised and patchified by the
            image processor (its own resize off), as `(B, 3, H, W)`."""
            import torch
            from PIL import Image

            h, w = input_hw
            resized = [
                np.asarray(Image.fromarray(i).resize((w, h), Image.Resampling.BICUBIC))
                for i in images
            ]
            out = self.image_processor(images=resized, do_resize=False, return_tensors="pt")
            flat, grid = out["pixel_values"], out["image_grid_thw"]
            grid_hw = (int(grid[0, 1]), int(grid[0, 2]))
            per_image = flat.reshape(len(images), -1, flat.shape[-1])
            temporal = int(vision.temporal_patch_size)
            return torch.cat(
                [unpatchify(p, grid_hw, patch, self.merge, temporal) for p in per_image]
            )

        return VisionSpec(
            module=qwen_vision_module(self.model, input_hw),
            input_hw=input_hw,
            tokens=self.image_tokens(input_hw),
            dim=int(vision.out_hidden_size),
            fingerprint=self.vision_fingerprint(),
            architecture=ARCHITECTURE,
            source=self.path,
            pixels=pixels,
        )

    def generate(self, image: np.ndarray, prompt: str, max_new_tokens: int = 12) -> Generation:
        """Greedy generation for one image and prompt (its one `<|image_pad|>` expanded)."""
        import torch

        device = next(self.model.parameters()).device
        pixels, grid = self.pixel_inputs([image])
        ids = torch.tensor([self.prompt_ids(prompt, image)], device=device)
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": pixels.to(device),
            "image_grid_thw": grid.to(device),
            "mm_token_type_ids": (ids == self.image_token_id).int(),
        }
        return Generation.greedy(self.model, self.tokenizer, inputs, max_new_tokens)[0]

    def image_tokens(self, input_hw: tuple[int, int]) -> int:
        """Image tokens for an input of `input_hw` pixels (one per merged patch)."""
        patch = int(self.model.config.vision_config.patch_size)
        return (input_hw[0] // patch) * (input_hw[1] // patch) // self.merge**2

    def vision_fingerprint(self) -> str:
        """What determines the vision features: the vision config, the text width and the
        weights of the tower and merger (see `weights_fingerprint`)."""
        config = self.model.config
        parts = {
            "vision_config": vision_config_dict(config.vision_config),
            "text_hidden_size": config.text_config.hidden_size,
        }
        return weights_fingerprint(parts, [("visual", self.model.model.visual)])

    def prompt_ids(
        self, prompt: str, image: np.ndarray, layout: ImageLayout | None = None
    ) -> list[int]:
        """Token ids of `prompt` with its `<|image_pad|>` expanded to the image's tokens: one
        placeholder, or one per image of `layout` (in its order) when `image` is a canvas of
        several images."""
        images = [image] if layout is None else layout.split(image)
        ids = [int(i) for i in self.tokenizer(prompt, add_special_tokens=False).input_ids]
        hits = ids.count(self.image_token_id)
        if hits != len(images):
            exactly = (
                "exactly one image placeholder"
                if len(images) == 1
                else (f"{len(images)} image placeholders, one per image")
            )
            raise ImageTokenError(
                f"the prompt must hold {exactly} "
                f"({self.tokenizer.convert_ids_to_tokens(self.image_token_id)!r}), found {hits}"
            )
        counts = iter([self.image_tokens(self.input_hw(i)) for i in images])
        out: list[int] = []
        for token in ids:
            out.extend([token] * next(counts) if token == self.image_token_id else [token])
        return out


def load_qwen(
    model_dir: str | Path,
    *,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> QwenModel:
    """Load a Qwen2.5-VL checkpoint from a local directory (never from a hub): the model, its
    image processor (`Qwen2VLImageProcessorPil`) and tokenizer.  `dtype` (float32 unless asked
    otherwise) and the errors raised (`ModelLoadError`, `ValueError`) as for `load_llava`."""
    path = Path(model_dir)
    model = load_pretrained(path, ARCHITECTURE, threads=threads, device=device, dtype=dtype)
    image_processor, tokenizer = load_processors(path, "Qwen2VLImageProcessorPil")
    return QwenModel(model=model, image_processor=image_processor, tokenizer=tokenizer, path=path)


def qwen_onnx_vision(
    qwen: QwenModel,
    path: str | Path,
    input_hw: tuple[int, int] | None = None,
    *,
    device: str = "cpu",
    threads: int = 0,
) -> OnnxVision:
    """Open a vision file exported for `qwen` at `input_hw` (default: the size the file was
    exported for), refusing one exported from another model or for another input size."""
    fingerprint = qwen.vision_fingerprint()
    return _open_vision(qwen, path, input_hw, fingerprint, device=device, threads=threads)


def _open_vision(
    qwen: QwenModel,
    path: str | Path,
    input_hw: tuple[int, int] | None,
    fingerprint: str,
    *,
    device: str,
    threads: int,
) -> OnnxVision:
    hw = onnx_input_hw(path) if input_hw is None else input_hw
    return OnnxVision(
        path,
        fingerprint=fingerprint,
        input_hw=hw,
        tokens=qwen.image_tokens(hw),
        dim=int(qwen.model.config.vision_config.out_hidden_size),
        device=device,
        threads=threads,
    )


def qwen_onnx_visions(
    qwen: QwenModel, path: str | Path, *, device: str = "cpu", threads: int = 0
) -> dict[tuple[int, int], OnnxVision]:
    """The exported vision files for `qwen` at `path` (one file, or every `*.onnx` in a
    directory), by the input size each serves.

    Raises:
        OnnxMismatchError: no file, a file from another model, or two files for one size.
    """
    path = Path(path)
    files = sorted(path.glob("*.onnx")) if path.is_dir() else [path]
    if not files:
        raise OnnxMismatchError(f"{str(path)!r} holds no .onnx files")
    fingerprint = qwen.vision_fingerprint()  # hashes every tower weight: once, not per file
    out: dict[tuple[int, int], OnnxVision] = {}
    for file in files:
        vision = _open_vision(qwen, file, None, fingerprint, device=device, threads=threads)
        if vision.input_hw in out:
            h, w = vision.input_hw
            raise OnnxMismatchError(
                f"{str(out[vision.input_hw].path)!r} and {str(file)!r} both serve {h}x{w} inputs"
            )
        out[vision.input_hw] = vision
    return out


def onnx_input_hw(path: str | Path) -> tuple[int, int]:
    """The `(H, W)` a vision file exported by `export_vision` takes.

    Raises:
        OnnxMismatchError: no such file, not ONNX, or not a `(batch, 3, H, W)` input.
    """
    import onnx

    where = str(path)
    if not Path(path).is_file():
        raise OnnxMismatchError(f"ONNX vision file {where!r} does not exist")
    try:
        graph = onnx.load(where, load_external_data=False).graph
    except Exception as exc:  # onnx raises its own untyped errors
        raise OnnxMismatchError(f"{where!r} is not a loadable ONNX model: {exc}") from exc
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] if graph.input else []
    if len(dims) != 4 or dims[1] != 3 or not dims[2] or not dims[3]:
        raise OnnxMismatchError(f"{where!r} does not take (batch, 3, H, W) pixels")
    return int(dims[2]), int(dims[3])


def patchify(images: Any, patch: int, merge: int, temporal: int) -> Any:
    """`(B, C, H, W)` -> `(B * H/P * W/P, C * T * P * P)` in the Qwen image processor's order."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh/m, gw/m, m, m, C, P, P)
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


def unpatchify(
    patches: Any, grid_hw: tuple[int, int], patch: int, merge: int, temporal: int
) -> Any:
    """The inverse of `patchify` for one image (first temporal copy): `(1, C, H, W)`."""
    gh, gw = grid_hw
    c = patches.shape[1] // (temporal * patch * patch)
    x = patches.reshape(gh // merge, gw // merge, merge, merge, c, temporal, patch, patch)[
        :, :, :, :, :, 0
    ]
    x = x.permute(4, 0, 2, 5, 1, 3, 6)  # (C, gh/m, m, P, gw/m, m, P)
    return x.reshape(1, c, gh * patch, gw * patch)


class QwenScorer(PlainScorer[QwenModel]):
    """The plain way (see `PlainScorer`), the masked images' patches concatenated.  With a
    `layout` of several images, every masked canvas is cut back into its images, given to the
    model as the prompt's several images."""

    label = "qwen2.5-vl"

    def _image_inputs(self, batch: MaskedBatch, ids: Any) -> dict[str, Any]:
        if batch.image.shape[:2] != self.layout.canvas_hw:
            raise InvalidImageError(
                f"the batch's image has shape {batch.image.shape}; this scorer was built for "
                f"{self.layout.canvas_hw}"
            )
        # every masked canvas's images, in prompt order, canvas after canvas
        images = [i for canvas in batch.pixels() for i in self.layout.split(canvas)]
        pixels, grid = self.loaded.pixel_inputs(images)
        return {
            "pixel_values": pixels.to(ids.device),
            "image_grid_thw": grid.to(ids.device),
            "mm_token_type_ids": (ids == self.loaded.image_token_id).int(),
        }


class FastQwenScorer(FastScorer[QwenModel]):
    """Tensor-space masks, the vision tower batched at this sample's geometry (ONNX Runtime or
    torch, see `detectors.scorers.families.qwen2_5_vl_vision`), and the language model with the
    text before the image cached and 3-D rope positions computed once (see `FastScorer`).

    Args:
        vision: an `OnnxVision` exported for this image's input size (see `qwen_onnx_vision`
            and `QwenModel.input_hw`), or None for the torch tower.

    Raises:
        OnnxMismatchError: `vision` was exported for another input size.
    """

    label = "qwen2.5-vl"

    def _build(self, prompt: str, vision: VisionRunner | None) -> None:
        qwen = self.loaded
        bases, grid = qwen.processed([self.image], self.device)
        grid = grid.to(self.device)
        hw = (int(bases[0].shape[-2]), int(bases[0].shape[-1]))
        prompt_ids = qwen.prompt_ids(prompt, self.image)
        span = image_span(prompt_ids, qwen.image_token_id, qwen.image_tokens(hw))
        self.lm = PrefixCachedLM.for_model(
            qwen.model,
            prompt_ids=prompt_ids,
            generated_ids=self.generated_ids,
            spans=[span],
            position_ids=qwen.rope_positions(prompt_ids + self.generated_ids, grid),
            timings=self.timings,
        )
        self.geometry = InputGeometry.resize_to(hw)
        exported_hw = getattr(vision, "input_hw", hw)
        if tuple(exported_hw) != hw:
            raise OnnxMismatchError(
                f"the vision file was exported for {exported_hw[0]}x{exported_hw[1]} inputs; "
                f"this image is processed to {hw[0]}x{hw[1]}"
            )
        self.vision = vision if vision is not None else qwen.torch_vision(hw)
        # the processed image doubles as the tensor-masking base (no second preprocessing)
        self._masks = {"base": bases[0], "fills": {}, "partition": None}

    def _preprocess(self, image: np.ndarray) -> Any:
        bases, _ = self.loaded.processed([image], self.device)
        return bases[0]


class QwenFamily(ScorerFactories):
    """Qwen2.5-VL checkpoints: a windowed ViT with 2-D rope, a patch merger, 3-D rope text."""

    loader = load_qwen
    plain_scorer_class = QwenScorer
    fast_scorer_class = FastQwenScorer

    name = "qwen2_5_vl"
    max_images = 16
    architecture = ARCHITECTURE
    image_placeholder = "<|image_pad|>"
    image_segment = "<|vision_start|><|image_pad|><|vision_end|>"
    caption_prompt = CAPTION_PROMPT_QWEN

    def yes_no_prompt(self, question: str) -> str:
        return (
            f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question} Answer "
            "yes or no.<|im_end|>\n<|im_start|>assistant\n"
        )

    def _fast_class(self, several: bool) -> type[Any]:
        """`FastQwenScorer`, or `FastQwenImagesScorer` for a layout of several images."""
        if not several:
            return FastQwenScorer
        from detectors.scorers.families.qwen2_5_vl_images import FastQwenImagesScorer

        return FastQwenImagesScorer

    def vision_spec(
        self,
        model: QwenModel,
        *,
        input_hw: tuple[int, int] | None = None,
        real_images: Sequence[np.ndarray] = (),
    ) -> VisionSpec:
        """A Qwen2.5-VL graph serves one input size: `input_hw` (pixels after the image
        processor), or the size the first real image gets."""
        if input_hw is None:
            if not real_images:
                raise ValueError(
                    "a Qwen2.5-VL export needs an input size or a real image to take it from"
                )
            input_hw = model.input_hw(real_images[0])
        return model.vision_spec(input_hw)

    def open_visions(
        self, model: QwenModel, path: str | Path, *, device: str = "cpu", threads: int = 0
    ) -> VisionFiles:
        return qwen_onnx_visions(model, path, device=device, threads=threads)


QWEN2_5_VL = QwenFamily()
