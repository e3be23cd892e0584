"""The fast scorer for LLaVA-family checkpoints.

Masks in tensor space, runs the vision tower and projector in ONNX Runtime (or torch) and the
language model in torch with the text before the image cached (see `detectors.scorers.fast`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detectors.scorers.fast import PrefixCachedLM, TensorMaskedScorer, image_span
from detectors.scorers.llava import LlavaModel
from detectors.scorers.masked import MaskedBatch
from detectors.scorers.tensor_masks import InputGeometry
from detectors.scorers.vision import (
    OnnxVision,
    TorchVision,
    VisionRunner,
    VisionSpec,
    llava_vision_fingerprint,
    llava_vision_module,
)

__all__ = [
    "FastLlavaScorer",
    "llava_geometry",
    "llava_image_tokens",
    "llava_onnx_vision",
    "llava_vision_spec",
]


def llava_geometry(llava: LlavaModel, image_hw: tuple[int, int]) -> InputGeometry:
    """Where the image processor puts an `(H, W)` image on the model's input grid."""
    proc = llava.processor.image_processor
    size = dict(proc.size or {})
    crop = dict(proc.crop_size or {}) if getattr(proc, "do_center_crop", False) else {}
    crop_hw = (int(crop["height"]), int(crop["width"])) if crop else None
    if not getattr(proc, "do_resize", True):
        geometry = InputGeometry.resize_to(image_hw)
        if crop_hw:
            return InputGeometry.shortest_edge_then_crop(image_hw, min(image_hw), crop_hw)
        return geometry
    if size.get("shortest_edge"):
        return InputGeometry.shortest_edge_then_crop(image_hw, int(size["shortest_edge"]), crop_hw)
    hw = (int(size["height"]), int(size["width"]))
    if crop_hw:
        return InputGeometry(
            resize_hw=hw,
            crop_box=((hw[0] - crop_hw[0]) // 2, (hw[1] - crop_hw[1]) // 2, *crop_hw),
        )
    return InputGeometry.resize_to(hw)


def llava_image_tokens(llava: LlavaModel) -> tuple[tuple[int, int], int, int]:
    """The model's input grid `(H, W)`, its number of image features and the text width."""
    config = llava.model.config
    vision = config.vision_config
    side = int(vision.image_size)
    tokens = (side // int(vision.patch_size)) ** 2
    if config.vision_feature_select_strategy != "default":
        tokens += 1
    return (side, side), tokens, int(config.text_config.hidden_size)


def llava_vision_spec(llava: LlavaModel) -> VisionSpec:
    """LLaVA's vision tower + projector, for `export_vision` and `OnnxVision`."""
    hw, tokens, dim = llava_image_tokens(llava)
    return VisionSpec(
        module=llava_vision_module(llava.model),
        input_hw=hw,
        tokens=tokens,
        dim=dim,
        fingerprint=llava_vision_fingerprint(llava.model),
        architecture="LlavaForConditionalGeneration",
        source=llava.path,
        pixels=lambda images: llava.pixel_values(list(images)),
    )


def llava_onnx_vision(
    llava: LlavaModel, path: str | Path, *, device: str = "cpu", threads: int = 0
) -> OnnxVision:
    """Open an exported vision file for `llava`, refusing one exported from another model."""
    return OnnxVision.for_spec(path, llava_vision_spec(llava), device=device, threads=threads)


class FastLlavaScorer(TensorMaskedScorer):
    """P(target | masked image, prompt, generated tokens before it) for a LLaVA checkpoint.

    Args:
        llava: the loaded model.
        image: the sample's image; prompt: the prompt with its image placeholder;
        generated_ids: the tokens the model generated (target positions index into these).
        vision: an `OnnxVision` (see `llava_onnx_vision`) or None for the torch tower.
        chunk_size: masked variants per forward pass (16 is best on 2 CPU cores).
    """

    def __init__(
        self,
        llava: LlavaModel,
        image: np.ndarray,
        prompt: str,
        generated_ids: Sequence[int],
        *,
        vision: VisionRunner | None = None,
        chunk_size: int = 16,
    ) -> None:

        self._setup(image, generated_ids, chunk_size)
        self.llava = llava
        self.vision: VisionRunner = vision or TorchVision(llava_vision_module(llava.model))
        model = llava.model
        self.device = next(model.parameters()).device
        _, tokens, _ = llava_image_tokens(llava)
        prompt_ids = llava.prompt_ids(prompt, self.image)
        start, count = image_span(prompt_ids, int(model.config.image_token_id), tokens)
        self.lm = PrefixCachedLM(
            decoder=model.model.language_model,
            embed=model.get_input_embeddings(),
            lm_head=model.lm_head,
            prompt_ids=prompt_ids,
            generated_ids=self.generated_ids,
            image_start=start,
            image_tokens=count,
            timings=self.timings,
        )
        self.geometry = llava_geometry(llava, self.image.shape[:2])

    @property
    def name(self) -> str:
        return f"llava-fast({self.llava.name}; {self.vision.name}; lm=torch:{self.device.type})"

    def _preprocess(self, image: np.ndarray) -> Any:
        import torch

        return self.llava.pixel_values([image]).to(self.device, torch.float32)

    def _encode(self, pixels: Any) -> Any:
        return self.vision(pixels)

    def masked_pixels(self, batch: MaskedBatch) -> Any:
        """`(B, 3, H, W)` preprocessed masked images, built in tensor space."""
        return self.masked_inputs(batch)
