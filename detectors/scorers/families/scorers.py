"""The scorers the families build on: a family names its model class and fills in what only
it knows (how a batch of images enters its model, its vision module, where its image lands).

`PlainScorer` is the plain way for every family: mask in pixel space, run the image processor
and one full forward per masked image.  `FastPixelScorer` is the fast way for a family whose
image processor gives `(B, 3, H, W)` pixels on one fixed input grid (LLaVA, InternVL): tensor
masks, the vision encoder in ONNX Runtime or torch, the language model with the text before the
image cached (see `detectors.scorers.fast`).  torch is imported inside functions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np

from detectors.layout import ImageLayout
from detectors.scorers.families.base import LoadedModel
from detectors.scorers.fast import (
    PrefixCachedLM,
    TensorMaskedScorer,
    check_targets,
    image_span,
    to_numpy,
)
from detectors.scorers.vision import TorchVision, VisionRunner
from detectors.types import Target

if TYPE_CHECKING:
    from detectors.scorers.masked import MaskedBatch
    from detectors.scorers.tensor_masks import InputGeometry

__all__ = ["FastPixelScorer", "FastScorer", "PixelModel", "PlainScorer", "fast_scorer_name"]

M = TypeVar("M", bound=LoadedModel)


class PixelModel(LoadedModel, Protocol):
    """A loaded model whose image processor gives `(B, 3, H, W)` pixel values."""

    def pixel_values(self, images: Sequence[np.ndarray]) -> Any: ...


P = TypeVar("P", bound=PixelModel)


def fast_scorer_name(label: str, model: str, parts: Sequence[str], device: Any) -> str:
    """A fast scorer's name: `<label>-fast(<model>; <parts>; lm=torch:<device type>)`."""
    return f"{label}-fast({'; '.join([model, *parts])}; lm=torch:{device.type})"


class PlainScorer(Generic[M]):
    """Scores masked images of one sample the plain way: P(target token | masked image,
    prompt, the tokens generated before it), teacher-forcing the generated tokens, one full
    forward per masked image (`max_batch_size` images per call).

    A family sets `label` (the scorer is named `<label>-torch(<model>)`) and implements
    `_image_inputs` (the model's image keyword arguments for a batch of masked images).

    Args:
        loaded: the loaded model.
        image: the sample's image (to expand the prompt's image placeholder); a canvas of
            several images where `layout` says so.
        prompt: the prompt as sent, with its image placeholder(s).
        generated_ids: the tokens the model generated (target positions index into these).
        max_batch_size: masked images per forward pass (default: the family's).
        layout: where the images lie on the canvas (None: one image).
    """

    label: ClassVar[str]
    default_batch_size: ClassVar[int] = 1

    def __init__(
        self,
        loaded: M,
        image: np.ndarray,
        prompt: str,
        generated_ids: Sequence[int],
        *,
        max_batch_size: int | None = None,
        layout: ImageLayout | None = None,
    ) -> None:
        self.loaded = loaded
        self.layout = layout or ImageLayout.single((int(image.shape[0]), int(image.shape[1])))
        self.prompt_ids = loaded.prompt_ids(prompt, image, self.layout)
        self.generated_ids = [int(i) for i in generated_ids]
        self._max_batch_size = self.default_batch_size if max_batch_size is None else max_batch_size

    @property
    def name(self) -> str:
        return f"{self.label}-torch({self.loaded.name})"

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    def _image_inputs(self, batch: MaskedBatch, ids: Any) -> dict[str, Any]:
        """The model's image keyword arguments for `batch`'s masked images (`ids`: the
        `(B, L)` input ids, on the model's device)."""
        raise NotImplementedError

    def score(self, batch: MaskedBatch, targets: Sequence[Target]) -> np.ndarray:
        import torch

        check_targets(targets, self.generated_ids)
        model = self.loaded.model
        device = next(model.parameters()).device
        last = max(t.position for t in targets)
        ids = torch.tensor(
            [self.prompt_ids + self.generated_ids[:last]] * batch.size, device=device
        )
        inputs = self._image_inputs(batch, ids)
        with torch.inference_mode():
            logits = model(input_ids=ids, **inputs).logits
        rows = torch.tensor([len(self.prompt_ids) + t.position - 1 for t in targets], device=device)
        logp = torch.log_softmax(logits[:, rows, :].float(), dim=-1)
        cols = torch.tensor([t.token_id for t in targets], device=device)
        probs = logp[:, torch.arange(len(targets), device=device), cols].exp()
        return to_numpy(probs)


class FastScorer(TensorMaskedScorer, Generic[M]):
    """P(target | masked image, prompt, generated tokens before it), the fast way (see
    `TensorMaskedScorer`), for one family's loaded model.

    A family sets `label` (the scorer is named `<label>-fast(<model>; <vision>; lm=...)`) and
    implements `_build` (its vision runner, language model and input geometry, from the prompt)
    and `_preprocess`.

    Args:
        loaded: the loaded model.
        image: the sample's image; prompt: the prompt with its image placeholder;
        generated_ids: the tokens the model generated (target positions index into these).
        vision: an `OnnxVision` exported for this model and this image's input size (see the
            family's `open_visions`), or None for the torch tower.
        chunk_size: masked variants per forward pass (16 is best on 2 CPU cores).
    """

    label: ClassVar[str]

    def __init__(
        self,
        loaded: M,
        image: np.ndarray,
        prompt: str,
        generated_ids: Sequence[int],
        *,
        vision: VisionRunner | None = None,
        chunk_size: int = 16,
    ) -> None:
        self._setup(image, generated_ids, chunk_size)
        self.loaded = loaded
        self.device = next(loaded.model.parameters()).device
        self._build(prompt, vision)

    def _build(self, prompt: str, vision: VisionRunner | None) -> None:
        """Set `vision`, `lm` and `geometry`."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        return fast_scorer_name(self.label, self.loaded.name, [self.vision.name], self.device)


class FastPixelScorer(FastScorer[P]):
    """The fast scorer of a family whose image processor gives `(B, 3, H, W)` pixels on one
    fixed input grid and whose prompt holds one run of image tokens (LLaVA, InternVL): tensor
    masks, the vision encoder in ONNX Runtime or torch, the language model with the text
    before the image cached and logits only at the target rows.

    A family sets `label` and implements `_vision_module` (its torch vision encoder),
    `_image_tokens` (image features per image) and `_geometry` (where the image processor puts
    the sample's image on the input grid).
    """

    def _build(self, prompt: str, vision: VisionRunner | None) -> None:
        model = self.loaded.model
        self.vision = vision or TorchVision(self._vision_module())
        prompt_ids = self.loaded.prompt_ids(prompt, self.image)
        span = image_span(prompt_ids, int(model.config.image_token_id), self._image_tokens())
        self.lm = PrefixCachedLM.for_model(
            model,
            prompt_ids=prompt_ids,
            generated_ids=self.generated_ids,
            spans=[span],
            timings=self.timings,
        )
        self.geometry = self._geometry()

    def _vision_module(self) -> Any:
        raise NotImplementedError

    def _image_tokens(self) -> int:
        raise NotImplementedError

    def _geometry(self) -> InputGeometry:
        raise NotImplementedError

    def _preprocess(self, image: np.ndarray) -> Any:
        import torch

        return self.loaded.pixel_values([image]).to(self.device, torch.float32)

    def masked_pixels(self, batch: MaskedBatch) -> Any:
        """`(B, 3, H, W)` preprocessed masked images, built in tensor space."""
        return self.masked_inputs(batch)
