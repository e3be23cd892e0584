"""What every model family provides: the `ModelFamily` and `LoadedModel` protocols; and what
the families share: `Checkpoint` (a loaded model's base), `Generation`, `ScorerFactories`
(a family's `load` and scorer constructors from its module's parts).  The scorers they build
on are in `detectors.scorers.families.scorers`.

A family is one module under `detectors.scorers.families` (LLaVA, Qwen2.5-VL, InternVL) with
one object implementing `ModelFamily`, registered by the architecture its checkpoints name in
config.json (see `detectors.scorers.families.registry`).  Nothing outside the families branches
on a family's name: callers look the family up and ask it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import numpy as np

from detectors.errors import ImageTokenError
from detectors.scorers.protocol import Scorer
from detectors.scorers.vision import OnnxVision, VisionRunner, VisionSpec

if TYPE_CHECKING:
    from detectors.layout import ImageLayout

__all__ = [
    "Checkpoint",
    "Generation",
    "LoadedModel",
    "ModelFamily",
    "VisionFiles",
    "check_layout",
    "one_image",
]

# the ONNX vision files opened for one model, by the processed input size `(H, W)` each serves
VisionFiles = Mapping[tuple[int, int], OnnxVision]


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Generation:
    """What the model said: the text and the generated token ids (special tokens included)."""

    text: str
    token_ids: tuple[int, ...]

    @classmethod
    def from_row(cls, row: Sequence[int], tokenizer: Any) -> Generation:
        """The tokens a `generate` call added, up to padding and through the end token."""
        ids: list[int] = []
        for token in row:
            if token == tokenizer.pad_token_id:
                break
            ids.append(int(token))
            if token == tokenizer.eos_token_id:
                break
        return cls(
            text=tokenizer.decode(ids, skip_special_tokens=True).strip(), token_ids=tuple(ids)
        )

    @classmethod
    def greedy(
        cls, model: Any, tokenizer: Any, inputs: Mapping[str, Any], max_new_tokens: int
    ) -> list[Generation]:
        """Greedy generation by a transformers `model` from `inputs` (its `generate` keyword
        arguments, `input_ids` `(B, L)` among them), one `Generation` per row."""
        import torch

        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        width = inputs["input_ids"].shape[1]
        return [cls.from_row(row, tokenizer) for row in out[:, width:].cpu().tolist()]


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Checkpoint:
    """What every family's loaded model holds: the transformers model and the directory it
    was loaded from; a family's model class adds what feeds the model and sets `family`."""

    model: Any
    path: Path
    family: ClassVar[str]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def image_token_id(self) -> int:
        """The id of the token each image feature stands in for in the prompt."""
        return int(self.model.config.image_token_id)


class LoadedModel(Protocol):
    """A checkpoint loaded by its family: the transformers model and what feeds it."""

    @property
    def model(self) -> Any: ...

    @property
    def path(self) -> Path: ...

    @property
    def family(self) -> str:
        """The registered family name (`ModelFamily.name`)."""
        ...

    @property
    def name(self) -> str: ...

    @property
    def tokenizer(self) -> Any: ...

    def input_hw(self, image: np.ndarray) -> tuple[int, int]:
        """The `(H, W)` pixels the model's image processor turns `image` into."""
        ...

    def prompt_ids(
        self, prompt: str, image: np.ndarray, layout: ImageLayout | None = None
    ) -> list[int]:
        """Token ids of `prompt` with its image placeholder expanded to the image tokens (one
        placeholder per image of `layout` when `image` is a canvas of several)."""
        ...

    def generate(self, image: np.ndarray, prompt: str, max_new_tokens: int = 12) -> Generation:
        """Greedy generation for one image and prompt."""
        ...


M = TypeVar("M", bound=LoadedModel)


class ModelFamily(Protocol[M]):
    """One family of checkpoints (one transformers architecture) and how to score it."""

    @property
    def name(self) -> str:
        """The family's name in the config file: "llava", "qwen2_5_vl", "internvl"."""
        ...

    @property
    def architecture(self) -> str:
        """The `architectures` entry of its checkpoints' config.json."""
        ...

    @property
    def image_placeholder(self) -> str:
        """The placeholder a prompt holds where an image goes."""
        ...

    @property
    def image_segment(self) -> str:
        """What stands for one image in a prompt of several (the placeholder with the
        family's markers around it)."""
        ...

    @property
    def max_images(self) -> int:
        """The most images one audited prompt may hold (1: the family is audited on one
        image; several are laid out on one canvas, see `detectors.layout`)."""
        ...

    @property
    def caption_prompt(self) -> str:
        """A caption request in the family's chat format, with its image placeholder."""
        ...

    def yes_no_prompt(self, question: str) -> str:
        """A yes/no question about the image in the family's chat format."""
        ...

    def load(
        self,
        model_dir: str | Path,
        *,
        threads: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> M:
        """Load a checkpoint from a local directory (never from a hub)."""
        ...

    def vision_spec(
        self,
        model: M,
        *,
        input_hw: tuple[int, int] | None = None,
        real_images: Sequence[np.ndarray] = (),
    ) -> VisionSpec:
        """The vision encoder (tower, projector) to export, for one processed input size."""
        ...

    def open_visions(
        self, model: M, path: str | Path, *, device: str = "cpu", threads: int = 0
    ) -> VisionFiles:
        """The exported vision file(s) at `path` (a file or a directory), refusing any
        exported from another model."""
        ...

    def plain_scorer(
        self,
        model: M,
        image: np.ndarray,
        prompt: str,
        generated_ids: Sequence[int],
        *,
        max_batch_size: int = 1,
        layout: ImageLayout | None = None,
    ) -> Scorer:
        """The plain scorer: masks in pixel space, one full forward per masked image; `image`
        is a canvas of several images where `layout` says so (`max_images` > 1 only)."""
        ...

    def fast_scorer(
        self,
        model: M,
        image: np.ndarray,
        prompt: str,
        generated_ids: Sequence[int],
        *,
        vision: VisionRunner | None = None,
        chunk_size: int = 16,
        layout: ImageLayout | None = None,
    ) -> Scorer:
        """Tensor-space masks, the text before the image cached, target-only logits; `vision`
        is an ONNX encoder for this image's input size or None for the torch tower; `layout`
        as for `plain_scorer`."""
        ...


def check_layout(family: str, max_images: int, layout: ImageLayout | None) -> bool:
    """Whether `layout` lays out several images (False for None or one image filling its
    canvas).

    Raises:
        ImageTokenError: more images than the family audits in one prompt.
    """
    if layout is None or layout.is_single:
        return False
    if layout.n_images > max_images:
        raise ImageTokenError(
            f"the {family} family audits at most {max_images} image(s) per prompt, got "
            f"{layout.n_images}"
        )
    return True


def one_image(family: str, layout: ImageLayout | None) -> None:
    """Refuse a layout of several images in a family that takes one."""
    check_layout(family, 1, layout)


class ScorerFactories:
    """What a family's `load`, `plain_scorer` and `fast_scorer` do, from its module's parts: a
    family sets `loader` (its `load_<family>` function), `plain_scorer_class` and
    `fast_scorer_class` (same constructor shape for every family); a layout of several images
    is passed on only to a family whose `max_images` allows it."""

    name: ClassVar[str]
    max_images: ClassVar[int] = 1
    loader: ClassVar[Callable[..., Any]]
    plain_scorer_class: ClassVar[type[Any]]
    fast_scorer_class: ClassVar[type[Any]]

    def load(
        self,
        model_dir: str | Path,
        *,
        threads: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> Any:
        return type(self).loader(model_dir, threads=threads, device=device, dtype=dtype)

    def _layout_kwargs(self, layout: ImageLayout | None) -> dict[str, Any]:
        return {"layout": layout} if check_layout(self.name, self.max_images, layout) else {}

    def _fast_class(self, several: bool) -> type[Any]:
        """The fast scorer class; a family with its own scorer for several images (whose
        constructor takes `layout`) returns it when `several`."""
        return self.fast_scorer_class

    def plain_scorer(
        self,
        model: Any,
        image: np.ndarray,
        prompt: str,
        generated_ids: Sequence[int],
        *,
        max_batch_size: int = 1,
        layout: ImageLayout | None = None,
    ) -> Any:
        return self.plain_scorer_class(
            model,
            image,
            prompt,
            generated_ids,
            max_batch_size=max_batch_size,
            **self._layout_kwargs(layout),
        )

    def fast_scorer(
        self,
        model: Any,
        image: np.ndarray,
        prompt: str,
        generated_ids: Sequence[int],
        *,
        vision: VisionRunner | None = None,
        chunk_size: int = 16,
        layout: ImageLayout | None = None,
    ) -> Any:
        several = self._layout_kwargs(layout)
        return self._fast_class(bool(several))(
            model,
            image,
            prompt,
            generated_ids,
            vision=vision,
            chunk_size=chunk_size,
            **several,
        )
