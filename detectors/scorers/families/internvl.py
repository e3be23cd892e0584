"""The InternVL family (`InternVLForConditionalGeneration`, InternVL3/3.5 in Hugging Face format):
loading, the plain and fast scorers, the vision tower + pixel shuffle + projector for ONNX.

Dynamic tiling is off: a sample is audited on the base tile only, the whole image resized to
one tile of the image processor's size (448x448 for InternVL3), with no extra tiles and no
thumbnail.  An attribution maps image regions to one grid of image features; with several
tiles a region would be cut across tiles of different scales and the region masks would have to
be applied to each of them.  On one tile a mask is one resize of the region map, exactly as for
LLaVA.  The prompt's one `<IMG_CONTEXT>` placeholder expands to `<img>`, one `<IMG_CONTEXT>`
per image feature, `</img>`, as the processor does.  The processor class itself is not used
(its video processor needs torchvision): the image processor and the tokenizer are loaded on
their own.  torch and transformers are imported inside functions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detectors.errors import ImageTokenError
from detectors.scorers.families.base import (
    Checkpoint,
    Generation,
    ScorerFactories,
    VisionFiles,
    one_image,
)
from detectors.scorers.families.scorers import FastPixelScorer, PlainScorer
from detectors.scorers.loading import load_pretrained, load_processors
from detectors.scorers.masked import MaskedBatch
from detectors.scorers.tensor_masks import InputGeometry
from detectors.scorers.vision import (
    OnnxVision,
    VisionSpec,
    vision_config_dict,
    weights_fingerprint,
)

if TYPE_CHECKING:
    from detectors.layout import ImageLayout

__all__ = [
    "INTERNVL",
    "FastInternVLScorer",
    "InternVLFamily",
    "InternVLModel",
    "InternVLScorer",
    "internvl_vision_module",
    "load_internvl",
]

ARCHITECTURE = "InternVLForConditionalGeneration"
IMAGE_PLACEHOLDER = "<IMG_CONTEXT>"
START_IMAGE, END_IMAGE = "<img>", "</img>"


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class InternVLModel(Checkpoint):
    """A loaded InternVL checkpoint: model, image processor, tokenizer, where it came from."""

    family = "internvl"
    image_processor: Any
    tokenizer: Any

    @property
    def tile_hw(self) -> tuple[int, int]:
        """The base tile's `(H, W)`: the image processor's size."""
        size = dict(self.image_processor.size or {})
        return int(size["height"]), int(size["width"])

    def input_hw(self, image: np.ndarray) -> tuple[int, int]:
        """Every image is resized to the one base tile (no dynamic tiling)."""
        return self.tile_hw

    def image_tokens(self) -> int:
        """Image features of one tile: patches per side, shrunk by the pixel shuffle, squared."""
        config = self.model.config
        patch = _pair(config.vision_config.patch_size)
        ratio = float(config.downsample_ratio)
        h, w = self.tile_hw
        return int(h // patch[0] * ratio) * int(w // patch[1] * ratio)

    def pixel_values(self, images: Sequence[np.ndarray]) -> Any:
        """`(B, 3, H, W)`: each image resized to the base tile and normalised."""
        out = self.image_processor(images=list(images), crop_to_patches=False, return_tensors="pt")
        return out["pixel_values"]

    def prompt_ids(
        self, prompt: str, image: np.ndarray, layout: ImageLayout | None = None
    ) -> list[int]:
        """Token ids of `prompt` with its one `<IMG_CONTEXT>` expanded to `<img>`, the image
        tokens, `</img>`.

        Raises:
            ImageTokenError: the prompt does not hold exactly one placeholder.
        """
        one_image("internvl", layout)
        ids = [int(i) for i in self.tokenizer(prompt, add_special_tokens=False).input_ids]
        hits = ids.count(self.image_token_id)
        if hits != 1:
            raise ImageTokenError(
                f"the prompt must hold exactly one image placeholder ({IMAGE_PLACEHOLDER!r}), "
                f"found {hits}"
            )
        start, end = self.tokenizer.convert_tokens_to_ids([START_IMAGE, END_IMAGE])
        at = ids.index(self.image_token_id)
        image_ids = [int(start), *[self.image_token_id] * self.image_tokens(), int(end)]
        return ids[:at] + image_ids + ids[at + 1 :]

    def generate(self, image: np.ndarray, prompt: str, max_new_tokens: int = 12) -> Generation:
        """Greedy generation for one image and prompt (on the base tile)."""
        import torch

        device = next(self.model.parameters()).device
        ids = torch.tensor([self.prompt_ids(prompt, image)], device=device)
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": self.pixel_values([image]).to(device, self.model.dtype),
        }
        return Generation.greedy(self.model, self.tokenizer, inputs, max_new_tokens)[0]

    def vision_fingerprint(self) -> str:
        """What determines the image features: the vision config, the pixel shuffle, the
        feature layer and strategy, the text width, the tower and projector weights."""
        config = self.model.config
        parts = {
            "vision_config": vision_config_dict(config.vision_config),
            "downsample_ratio": config.downsample_ratio,
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "projector_hidden_act": getattr(config, "projector_hidden_act", None),
            "text_hidden_size": config.text_config.hidden_size,
        }
        inner = self.model.model
        return weights_fingerprint(
            parts,
            [("tower", inner.vision_tower), ("projector", inner.multi_modal_projector)],
        )

    def vision_spec(self) -> VisionSpec:
        """The tower, pixel shuffle and projector at the base tile, for `export_vision`."""
        return VisionSpec(
            module=internvl_vision_module(self.model, self.tile_hw),
            input_hw=self.tile_hw,
            tokens=self.image_tokens(),
            dim=int(self.model.config.text_config.hidden_size),
            fingerprint=self.vision_fingerprint(),
            architecture=ARCHITECTURE,
            source=self.path,
            pixels=lambda images: self.pixel_values(list(images)),
        )


def internvl_vision_module(model: Any, tile_hw: tuple[int, int]) -> Any:
    """A `torch.nn.Module` mapping `(B, 3, H, W)` tiles to `(B, T, D)` image features: the
    chosen tower layer, the CLS token dropped under the "default" strategy, the pixel shuffle
    (`downsample_ratio`) at the static grid of `tile_hw`, the projector; the same operations
    as `InternVLModel.get_image_features`, without its Python-side shape work."""
    import torch

    config = model.config
    layer = config.vision_feature_layer
    strategy = config.vision_feature_select_strategy
    ratio = float(config.downsample_ratio)
    patch = _pair(config.vision_config.patch_size)
    side = tile_hw[0] // patch[0]
    if tile_hw[0] // patch[0] != tile_hw[1] // patch[1] or int(side * ratio) != side * ratio:
        raise ImageTokenError(
            f"an InternVL tile of {tile_hw[0]}x{tile_hw[1]} pixels is not a square grid of "
            f"patches divisible by the pixel shuffle ({ratio})"
        )
    shrunk = int(side * ratio)

    class InternVLVision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = model.model.vision_tower
            self.projector = model.model.multi_modal_projector

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            if layer == -1:
                x = self.tower(pixel_values=pixel_values).last_hidden_state
            else:
                x = self.tower(pixel_values=pixel_values, output_hidden_states=True)
                x = x.hidden_states[layer]
            if strategy == "default":
                x = x[:, 1:]
            b, dim = x.shape[0], x.shape[-1]
            # the pixel shuffle of transformers' InternVLModel.pixel_shuffle, shapes static
            x = x.reshape(b, side, shrunk, int(dim / ratio))
            x = x.permute(0, 2, 1, 3).reshape(b, shrunk, shrunk, int(dim / ratio**2))
            x = x.permute(0, 2, 1, 3).reshape(b, shrunk * shrunk, int(dim / ratio**2))
            out: torch.Tensor = self.projector(x)
            return out

    return InternVLVision().eval()


def load_internvl(
    model_dir: str | Path,
    *,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> InternVLModel:
    """Load an InternVL checkpoint (HF format) from a local directory (never from a hub):
    the model, its image processor (`GotOcr2ImageProcessorPil`) and tokenizer.  `dtype` and
    the errors raised as for `load_llava`."""
    path = Path(model_dir)
    model = load_pretrained(path, ARCHITECTURE, threads=threads, device=device, dtype=dtype)
    image_processor, tokenizer = load_processors(path, "GotOcr2ImageProcessorPil")
    return InternVLModel(
        model=model, image_processor=image_processor, tokenizer=tokenizer, path=path
    )


class InternVLScorer(PlainScorer[InternVLModel]):
    """The plain way for an InternVL checkpoint, on the base tile (see `PlainScorer`)."""

    label = "internvl"

    def _image_inputs(self, batch: MaskedBatch, ids: Any) -> dict[str, Any]:
        pixels = self.loaded.pixel_values(list(batch.pixels()))
        return {"pixel_values": pixels.to(ids.device, self.loaded.model.dtype)}


class FastInternVLScorer(FastPixelScorer[InternVLModel]):
    """P(target | masked image, prompt, generated tokens before it) for an InternVL checkpoint:
    tensor-space masks on the base tile, the vision tower + pixel shuffle + projector in ONNX
    Runtime (or torch) (see `FastPixelScorer`; `vision`: from `InternVLFamily.open_visions`)."""

    label = "internvl"

    def _vision_module(self) -> Any:
        return internvl_vision_module(self.loaded.model, self.loaded.tile_hw)

    def _image_tokens(self) -> int:
        return self.loaded.image_tokens()

    def _geometry(self) -> InputGeometry:
        return InputGeometry.resize_to(self.loaded.tile_hw)


class InternVLFamily(ScorerFactories):
    """InternVL3/3.5 checkpoints: InternViT, pixel shuffle, an MLP projector, a Qwen2 LM."""

    loader = load_internvl
    plain_scorer_class = InternVLScorer
    fast_scorer_class = FastInternVLScorer

    name = "internvl"
    architecture = ARCHITECTURE
    image_placeholder = IMAGE_PLACEHOLDER
    image_segment = IMAGE_PLACEHOLDER
    caption_prompt = (
        "<|im_start|>user\n<IMG_CONTEXT>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
    )

    def yes_no_prompt(self, question: str) -> str:
        return (
            f"<|im_start|>user\n<IMG_CONTEXT>\n{question} Answer yes or no.<|im_end|>\n"
            "<|im_start|>assistant\n"
        )

    def vision_spec(
        self,
        model: InternVLModel,
        *,
        input_hw: tuple[int, int] | None = None,
        real_images: Sequence[np.ndarray] = (),
    ) -> VisionSpec:
        if input_hw is not None and tuple(input_hw) != model.tile_hw:
            raise ValueError(
                f"an InternVL export serves its base tile ({model.tile_hw[0]}x"
                f"{model.tile_hw[1]}), not {input_hw[0]}x{input_hw[1]}"
            )
        return model.vision_spec()

    def open_visions(
        self, model: InternVLModel, path: str | Path, *, device: str = "cpu", threads: int = 0
    ) -> VisionFiles:
        vision = OnnxVision.for_spec(path, model.vision_spec(), device=device, threads=threads)
        return {vision.input_hw: vision}


INTERNVL = InternVLFamily()
