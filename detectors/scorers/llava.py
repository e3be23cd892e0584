"""A plain, correct scorer for LLaVA-family checkpoints (`LlavaForConditionalGeneration`).

It masks images in pixel space, runs the image processor on each masked image and one full
forward pass per masked image (in batches), under teacher forcing of the generated tokens.
torch and transformers are imported here only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detectors.errors import ImageTokenError, InvalidTargetError, MissingDependencyError
from detectors.scorers.loading import ModelLoadError, model_family, torch_dtype
from detectors.scorers.masked import MaskedBatch
from detectors.types import Target

__all__ = ["Generation", "LlavaModel", "LlavaScorer", "ModelLoadError", "load_llava"]


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


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class LlavaModel:
    """A loaded LLaVA checkpoint: the model, its processor, and where it came from."""

    model: Any
    processor: Any
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def pixel_values(self, images: Sequence[np.ndarray]) -> Any:
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        return out["pixel_values"]

    def prompt_ids(self, prompt: str, image: np.ndarray) -> list[int]:
        """Token ids of `prompt` with its image placeholder expanded to the image tokens.

        Raises:
            ImageTokenError: the prompt does not hold exactly one image placeholder.
        """
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
        import torch

        tokenizer = self.tokenizer
        encoded = self.processor(
            images=list(images), text=list(prompts), return_tensors="pt", padding=True
        )
        encoded = encoded.to(next(self.model.parameters()).device)
        with torch.inference_mode():
            out = self.model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        width = encoded["input_ids"].shape[1]
        return [Generation.from_row(row, tokenizer) for row in out[:, width:].cpu().tolist()]


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
    model_family(path, expected="llava")
    try:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration
    except ImportError as exc:  # pragma: no cover - torch is a core dependency
        raise MissingDependencyError(
            "scoring a LLaVA model needs torch and transformers: pip install eagle-guardrail"
        ) from exc
    if threads:
        torch.set_num_threads(threads)
    model = LlavaForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=torch_dtype(dtype)
    )
    model.to(torch.device(device)).eval()  # type: ignore[arg-type]  # transformers types .to oddly
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return LlavaModel(model=model, processor=processor, path=path)


class LlavaScorer:
    """Scores masked images of one sample: P(target token | masked image, prompt, the tokens
    generated before it), teacher-forcing the generated tokens.

    Args:
        llava: the loaded model.
        image: the sample's image (to expand the prompt's image placeholder).
        prompt: the prompt as sent, with the image placeholder.
        generated_ids: the tokens the model generated (positions index into these).
        max_batch_size: masked images per forward pass.
    """

    def __init__(
        self,
        llava: LlavaModel,
        image: np.ndarray,
        prompt: str,
        generated_ids: Sequence[int],
        *,
        max_batch_size: int = 16,
    ) -> None:
        self.llava = llava
        self.prompt_ids = llava.prompt_ids(prompt, image)
        self.generated_ids = [int(i) for i in generated_ids]
        self._max_batch_size = max_batch_size

    @property
    def name(self) -> str:
        return f"llava-torch({self.llava.name})"

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    def check_targets(self, targets: Sequence[Target]) -> None:
        for t in targets:
            if t.position >= len(self.generated_ids):
                raise InvalidTargetError(
                    f"target position {t.position} is outside the {len(self.generated_ids)} "
                    "generated tokens"
                )
            if self.generated_ids[t.position] != t.token_id:
                raise InvalidTargetError(
                    f"target {t.text!r} says token {t.token_id} at position {t.position}, "
                    f"but the model generated {self.generated_ids[t.position]} there"
                )

    def score(self, batch: MaskedBatch, targets: Sequence[Target]) -> np.ndarray:
        import torch

        self.check_targets(targets)
        last = max(t.position for t in targets)
        ids = self.prompt_ids + self.generated_ids[:last]
        device = next(self.llava.model.parameters()).device
        input_ids = torch.tensor([ids] * batch.size, dtype=torch.long, device=device)
        pixels = self.llava.pixel_values(list(batch.pixels())).to(device)
        with torch.inference_mode():
            logits = self.llava.model(input_ids=input_ids, pixel_values=pixels).logits
        rows = torch.tensor([len(self.prompt_ids) + t.position - 1 for t in targets], device=device)
        logp = torch.log_softmax(logits[:, rows, :].float(), dim=-1)
        cols = torch.tensor([t.token_id for t in targets], device=device)
        probs = logp[:, torch.arange(len(targets), device=device), cols].exp()
        return np.asarray(probs.cpu().numpy(), dtype=np.float64)
