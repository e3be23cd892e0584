"""The LLaVA family (`LlavaForConditionalGeneration`): loading, the plain scorer, the vision
tower + projector for ONNX, and the fast scorer.

The plain scorer masks images in pixel space, runs the image processor on each masked image and
one full forward pass per masked image (in batches), under teacher forcing of the generated
tokens.  The fast scorer masks in tensor space, runs the vision tower and projector in ONNX
Runtime (or torch) and the language model in torch with the text before the image cached (see
`detectors.scorers.fast`).  torch and transformers are imported inside functions only.
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
from detectors.scorers.loading import (
    ModelLoadError,
    load_pretrained,
)
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
    "LLAVA",
    "FastLlavaScorer",
    "Generation",
    "LlavaFamily",
    "LlavaModel",
    "LlavaScorer",
    "ModelLoadError",
    "llava_geometry",
    "llava_image_tokens",
    "llava_onnx_vision",
    "llava_vision_fingerprint",
    "llava_vision_module",
    "llava_vision_spec",
    "load_llava",
]

ARCHITECTURE = "LlavaForConditionalGeneration"


def llava_vision_module(model: Any) -> Any:
    """A `torch.nn.Module` computing what LLaVA splices in for the image tokens: the chosen
    vision-tower layer(s), the CLS token dropped under the "default" strategy, the projector."""
    import torch

    config = model.config
    layer = config.vision_feature_layer
    strategy = config.vision_feature_select_strategy

    class LlavaVision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = model.model.vision_tower
            self.projector = model.model.multi_modal_projector

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            states = self.tower(pixel_values, output_hidden_states=True).hidden_states
            layers = [layer] if isinstance(layer, int) else list(layer)
            picked = [states[i][:, 1:] if strategy == "default" else states[i] for i in layers]
            out: torch.Tensor = self.projector(torch.cat(picked, dim=-1))
            return out

    return LlavaVision().eval()


def llava_vision_fingerprint(model: Any) -> str:
    """What determines LLaVA's vision features: the vision and projector config, the weights
    of the vision tower and projector."""
    config = model.config
    parts: dict[str, Any] = {
        "vision_config": vision_config_dict(config.vision_config),
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "projector_hidden_act": getattr(config, "projector_hidden_act", None),
        "text_hidden_size": config.text_config.hidden_size,
    }
    return weights_fingerprint(
        parts,
        [("tower", model.model.vision_tower), ("projector", model.model.multi_modal_projector)],
    )


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class LlavaModel(Checkpoint):
    """A loaded LLaVA checkpoint: the model, its processor, and where it came from."""

    family = "llava"
    processor: Any

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def input_hw(self, image: np.ndarray) -> tuple[int, int]:
        """The model's fixed input grid: every image is resized and cropped to it."""
        hw, _, _ = llava_image_tokens(self)
        return hw

    def pixel_values(self, images: Sequence[np.ndarray]) -> Any:
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        return out["pixel_values"]

    def prompt_ids(
        self, prompt: str, image: np.ndarray, layout: ImageLayout | None = None
    ) -> list[int]:
        """Token ids of `prompt` with its image placeholder expanded to the image tokens.

        Raises:
            ImageTokenError: the prompt does not hold exactly one image placeholder.
        """
        one_image("llava", layout)
        placeholder = self.processor.image_token
        if prompt.count(placeholder) != 1:
            raise ImageTokenError(
                f"the prompt must hold exactly one image placeholder ({placeholder!r}), found "
                f"{prompt.count(placeholder)}"
            )
        encoded = self.processor(images=[image], text=[prompt], return_tensors="pt")
        return [int(i) for i in encoded["input_ids"][0]]

    def generate(self, image: np.ndarray, prompt: str, max_new_tokens: int = 12) -> Generation:
        """Greedy generation for one image and prompt."""
        return self.generate_batch([image], [prompt], max_new_tokens)[0]

    def generate_batch(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], max_new_tokens: int = 12
    ) -> list[Generation]:
        """Greedy generation for a batch (prompts are left-padded to one length)."""
        encoded = self.processor(
            images=list(images), text=list(prompts), return_tensors="pt", padding=True
        )
        encoded = encoded.to(next(self.model.parameters()).device)
        return Generation.greedy(self.model, self.tokenizer, encoded, max_new_tokens)


def load_llava(
    model_dir: str | Path,
    *,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> LlavaModel:
    """Load a LLaVA checkpoint from a local directory (never from a hub).

    `dtype` is the weights' dtype whatever the checkpoint was saved in: "float32" (keeps the
    fast path within 1e-5 of a plain forward), or "bfloat16" / "float16" (half the memory, for
    GPUs; probabilities move by up to about 1e-2).

    Raises:
        ModelLoadError: the directory is missing, has no config.json, or holds another
            architecture.
        MissingDependencyError: torch or transformers is not installed.
        ValueError: an unknown dtype.
    """
    path = Path(model_dir)
    model = load_pretrained(path, ARCHITECTURE, threads=threads, device=device, dtype=dtype)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return LlavaModel(model=model, processor=processor, path=path)


class LlavaScorer(PlainScorer[LlavaModel]):
    """The plain way for a LLaVA checkpoint (see `PlainScorer`; 16 masked images per forward
    unless `max_batch_size` says otherwise)."""

    label = "llava"
    default_batch_size = 16

    def _image_inputs(self, batch: MaskedBatch, ids: Any) -> dict[str, Any]:
        return {"pixel_values": self.loaded.pixel_values(list(batch.pixels())).to(ids.device)}


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
        architecture=ARCHITECTURE,
        source=llava.path,
        pixels=lambda images: llava.pixel_values(list(images)),
    )


def llava_onnx_vision(
    llava: LlavaModel, path: str | Path, *, device: str = "cpu", threads: int = 0
) -> OnnxVision:
    """Open an exported vision file for `llava`, refusing one exported from another model."""
    return OnnxVision.for_spec(path, llava_vision_spec(llava), device=device, threads=threads)


class FastLlavaScorer(FastPixelScorer[LlavaModel]):
    """P(target | masked image, prompt, generated tokens before it) for a LLaVA checkpoint
    (see `FastPixelScorer`; `vision`: an `OnnxVision` from `llava_onnx_vision` or None)."""

    label = "llava"

    def _vision_module(self) -> Any:
        return llava_vision_module(self.loaded.model)

    def _image_tokens(self) -> int:
        return llava_image_tokens(self.loaded)[1]

    def _geometry(self) -> InputGeometry:
        return llava_geometry(self.loaded, self.image.shape[:2])


class LlavaFamily(ScorerFactories):
    """LLaVA-style checkpoints: CLIP-like tower, a projector, a Llama-like language model."""

    loader = load_llava
    plain_scorer_class = LlavaScorer
    fast_scorer_class = FastLlavaScorer

    name = "llava"
    architecture = ARCHITECTURE
    image_placeholder = "<image>"
    image_segment = "<image>"
    caption_prompt = "USER: <image> Describe the image. ASSISTANT:"

    def yes_no_prompt(self, question: str) -> str:
        # the question before the image, as the reference model was trained (`question_prompt`)
        return f"USER: {question} <image> ASSISTANT:"

    def vision_spec(
        self,
        model: LlavaModel,
        *,
        input_hw: tuple[int, int] | None = None,
        real_images: Sequence[np.ndarray] = (),
    ) -> VisionSpec:
        return llava_vision_spec(model)

    def open_visions(
        self, model: LlavaModel, path: str | Path, *, device: str = "cpu", threads: int = 0
    ) -> VisionFiles:
        vision = llava_onnx_vision(model, path, device=device, threads=threads)
        return {vision.input_hw: vision}


LLAVA = LlavaFamily()
