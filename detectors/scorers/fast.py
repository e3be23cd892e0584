"""The fast scoring path shared by the model families.

For one sample, everything that does not depend on the mask is computed once: the text before
the image runs through the language model once and is reused as a KV cache for every masked
variant; the text after the image is embedded once; the sequence is cut after the last target
position; logits are computed only at the rows that predict a target, in fp32.  Per chunk of
masked variants only the vision encoder and the language model over the image and the text
after it run.  `timings` accumulates where the time goes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from detectors.errors import ImageTokenError, InvalidTargetError
from detectors.scorers.vision import VisionRunner
from detectors.types import Target

__all__ = [
    "ChunkedScorer",
    "PrefixCachedLM",
    "TensorMaskedScorer",
    "Timings",
    "check_targets",
    "image_span",
    "image_spans",
]


@dataclass
class Timings:
    """Seconds spent per stage, summed over calls (`calls` scorer calls, `rows` variants)."""

    masking: float = 0.0
    vision: float = 0.0
    language_model: float = 0.0
    decoder_forward: float = 0.0  # the language model's own forward, inside `language_model`
    total: float = 0.0
    calls: int = 0
    rows: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {
            "masking": self.masking,
            "vision": self.vision,
            "language_model": self.language_model,
            "decoder_forward": self.decoder_forward,
            "total": self.total,
            "calls": self.calls,
            "rows": self.rows,
        }


def image_span(ids: Sequence[int], image_token_id: int, expected: int) -> tuple[int, int]:
    """`(start, count)` of the one contiguous run of image tokens in `ids`.

    Raises:
        ImageTokenError: no image token, several runs, or a count other than `expected`.
    """
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    if not where:
        raise ImageTokenError("the prompt has no image placeholder token")
    start, count = where[0], len(where)
    if where[-1] - start + 1 != count:
        raise ImageTokenError(
            "the prompt's image tokens are not one contiguous run (several images?)"
        )
    if count != expected:
        raise ImageTokenError(
            f"the prompt has {count} image tokens but the image gives {expected} features"
        )
    return start, count


def image_spans(
    ids: Sequence[int], image_token_id: int, expected: Sequence[int]
) -> list[tuple[int, int]]:
    """`(start, count)` of each contiguous run of image tokens in `ids`, one per image.

    Raises:
        ImageTokenError: not one run per image, or a run of another length than its image's.
    """
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(ids):
        if t != image_token_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    if len(runs) != len(expected):
        raise ImageTokenError(
            f"the prompt has {len(runs)} runs of image tokens for {len(expected)} images"
        )
    for n, ((_, count), want) in enumerate(zip(runs, expected, strict=True)):
        if count != want:
            raise ImageTokenError(
                f"image {n + 1}: the prompt has {count} image tokens but the image gives "
                f"{want} features"
            )
    return runs


def check_targets(targets: Sequence[Target], generated_ids: Sequence[int]) -> None:
    """Every target must name a generated token, at a position that exists."""
    if not targets:
        raise InvalidTargetError("no targets to score")
    for t in targets:
        if not 0 <= t.position < len(generated_ids):
            raise InvalidTargetError(
                f"target position {t.position} is outside the {len(generated_ids)} generated tokens"
            )
        if generated_ids[t.position] != t.token_id:
            raise InvalidTargetError(
                f"target {t.text!r} says token {t.token_id} at position {t.position}, "
                f"but the model generated {generated_ids[t.position]} there"
            )


class PrefixCachedLM:
    """Teacher-forced target probabilities for batches of image features.

    Args:
        decoder: the language model without its head (takes `inputs_embeds`, `cache`).
        embed: its input embedding module.
        lm_head: its output projection.
        prompt_ids: the prompt with its image tokens expanded; generated_ids: what was generated.
        image_start, image_tokens: where the image features go (one image).
        image_spans: `(start, count)` per image instead, for several images (the features
            of all images concatenated in this order); `image_start` is then the first start.
        position_ids: `(k, 1, L)` explicit positions for the whole prompt + generation (3D rope
            models), or None for 1-D positions.
    """

    def __init__(
        self,
        *,
        decoder: Any,
        embed: Any,
        lm_head: Any,
        prompt_ids: Sequence[int],
        generated_ids: Sequence[int],
        image_start: int,
        image_tokens: int,
        image_spans: Sequence[tuple[int, int]] | None = None,
        position_ids: Any = None,
        timings: Timings | None = None,
    ) -> None:
        import torch

        spans = list(image_spans) if image_spans else [(image_start, image_tokens)]
        if spans[0][0] != image_start:
            raise ImageTokenError(
                f"the first image starts at {spans[0][0]}, not at image_start={image_start}"
            )
        # where each image's features go, relative to the first image's start
        self._slots = [(s - image_start, n) for s, n in spans]
        image_tokens = sum(n for _, n in spans)

        self.timings = timings if timings is not None else Timings()
        self.decoder, self.embed, self.lm_head = decoder, embed, lm_head
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.generated_ids = [int(i) for i in generated_ids]
        self.ids = self.prompt_ids + self.generated_ids
        self.image_start, self.image_tokens = image_start, image_tokens
        self.position_ids = position_ids
        self.device = next(lm_head.parameters()).device
        self.dtype = next(lm_head.parameters()).dtype
        self._caches: dict[int, Any] = {}
        self._suffix: dict[int, Any] = {}
        with torch.inference_mode():
            prefix = torch.tensor([self.ids[:image_start]], device=self.device)
            self._prefix_cache = None
            if image_start:
                out = self.decoder(
                    inputs_embeds=self.embed(prefix),
                    position_ids=self._positions(0, image_start, 1),
                    use_cache=True,
                )
                self._prefix_cache = out.cache if hasattr(out, "cache") else out.past_key_values

    @classmethod
    def for_model(
        cls,
        model: Any,
        *,
        prompt_ids: Sequence[int],
        generated_ids: Sequence[int],
        spans: Sequence[tuple[int, int]],
        position_ids: Any = None,
        timings: Timings | None = None,
    ) -> PrefixCachedLM:
        """The language model of a transformers `...ForConditionalGeneration` `model` (its
        `model.language_model`, input embeddings and `lm_head`), with the image features going
        to `spans`, `(start, count)` per image in prompt order."""
        return cls(
            decoder=model.model.language_model,
            embed=model.get_input_embeddings(),
            lm_head=model.lm_head,
            prompt_ids=prompt_ids,
            generated_ids=generated_ids,
            image_start=spans[0][0],
            image_tokens=sum(n for _, n in spans),
            image_spans=spans if len(spans) > 1 else None,
            position_ids=position_ids,
            timings=timings,
        )

    def _positions(self, start: int, stop: int, batch: int) -> Any:
        if self.position_ids is None:
            return None
        return self.position_ids[:, :, start:stop].expand(-1, batch, -1)

    def _cache(self, batch: int) -> Any:
        """The prefix cache repeated `batch` times (made once per batch size, cropped back
        to the prefix after every use)."""
        import copy

        if self._prefix_cache is None:
            return None
        cache = self._caches.get(batch)
        if cache is None:
            cache = copy.deepcopy(self._prefix_cache)
            cache.batch_repeat_interleave(batch)
            self._caches[batch] = cache
        return cache

    def _suffix_embeds(self, stop: int) -> Any:
        import torch

        embeds = self._suffix.get(stop)
        if embeds is None:
            ids = torch.tensor([self.ids[self.image_start : stop]], device=self.device)
            with torch.inference_mode():
                embeds = self.embed(ids)
            self._suffix[stop] = embeds
        return embeds

    def probs(self, features: Any, targets: Sequence[Target]) -> Any:
        """`(b, len(targets))` float32 tensor for `(b, image_tokens, D)` features."""
        import torch

        b = int(features.shape[0])
        if features.shape[1] != self.image_tokens:
            raise ImageTokenError(
                f"the vision encoder gave {features.shape[1]} features for "
                f"{self.image_tokens} image tokens"
            )
        base = len(self.prompt_ids)
        stop = base + max(t.position for t in targets)  # the last row that predicts a target
        embeds = self._suffix_embeds(stop).expand(b, -1, -1).clone()
        features = features.to(self.dtype)
        taken = 0
        for at, n in self._slots:
            embeds[:, at : at + n] = features[:, taken : taken + n]
            taken += n
        cache = self._cache(b)
        with torch.inference_mode():
            started = time.perf_counter()
            out = self.decoder(
                inputs_embeds=embeds,
                cache=cache,
                position_ids=self._positions(self.image_start, stop, b),
                use_cache=cache is not None,
            )
            if out.last_hidden_state.is_cuda:
                torch.cuda.synchronize()
            self.timings.decoder_forward += time.perf_counter() - started
            if cache is not None:
                cache.crop(-(stop - self.image_start))
            rows = torch.tensor(
                [base + t.position - 1 - self.image_start for t in targets], device=self.device
            )
            hidden = out.last_hidden_state[:, rows]
            logits = self.lm_head(hidden).float()
            logp = torch.log_softmax(logits, dim=-1)
            cols = torch.tensor([t.token_id for t in targets], device=self.device)
            picked = logp[:, torch.arange(len(targets), device=self.device), cols]
        return picked.exp()


def run_timed(timings: Timings, stage: str, fn: Any, *args: Any) -> Any:
    """Call `fn(*args)` and add its seconds to `timings.<stage>` (synchronising CUDA)."""
    import torch

    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available() and getattr(out, "is_cuda", False):
        torch.cuda.synchronize()
    setattr(timings, stage, getattr(timings, stage) + time.perf_counter() - start)
    return out


def to_numpy(probs: Any) -> np.ndarray:
    return np.asarray(probs.detach().to("cpu").double().numpy(), dtype=np.float64)


class ChunkedScorer:
    """The scoring loop the fast scorers share: the batch's kept-region matrix readied once,
    then image features and target probabilities a chunk of `chunk_size` rows at a time.

    A subclass sets `image`, `generated_ids`, `chunk_size` and `timings` (`_setup`) and `lm`
    (a `PrefixCachedLM`), and implements `_prepare_masks` (a batch -> its `(B, R)` kept-region
    matrix on the device) and `_chunk_features` (rows of it -> `(b, T, D)` image features).
    """

    image: np.ndarray
    generated_ids: list[int]
    chunk_size: int
    lm: PrefixCachedLM
    timings: Timings

    def _setup(self, image: np.ndarray, generated_ids: Sequence[int], chunk_size: int) -> None:
        """What every fast scorer's constructor does first."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.image = np.asarray(image)
        self.generated_ids = [int(i) for i in generated_ids]
        self.chunk_size = chunk_size
        self.timings = Timings()

    @property
    def max_batch_size(self) -> int:
        return self.chunk_size

    def _check_image(self, batch: Any) -> None:
        from detectors.errors import InvalidImageError

        if batch.image.shape != self.image.shape:
            raise InvalidImageError(
                f"the batch's image has shape {batch.image.shape}; this scorer was built for "
                f"{self.image.shape}"
            )

    def _prepare_masks(self, batch: Any) -> Any:
        raise NotImplementedError

    def _chunk_features(self, keep: Any, fill: Any) -> Any:
        raise NotImplementedError

    def score(self, batch: Any, targets: Sequence[Target]) -> np.ndarray:
        import torch

        started = time.perf_counter()
        check_targets(targets, self.generated_ids)
        t = self.timings
        keep = run_timed(t, "masking", self._prepare_masks, batch)
        out = []
        for i in range(0, batch.size, self.chunk_size):
            features = self._chunk_features(keep[i : i + self.chunk_size], batch.fill)
            out.append(run_timed(t, "language_model", self.lm.probs, features, targets))
        probs = to_numpy(torch.cat(out))
        t.calls += 1
        t.rows += batch.size
        t.total += time.perf_counter() - started
        return probs


class TensorMaskedScorer(ChunkedScorer):
    """What the fast scorers of one image share: masked variants built in tensor space from
    the sample's preprocessed image and fill image, encoded by `vision` a chunk at a time.

    A subclass sets what `ChunkedScorer` asks, `device`, `geometry` and `vision`, and implements
    `_preprocess` (an image as the model's `(1, C, H, W)` input).
    """

    device: Any
    geometry: Any
    vision: VisionRunner

    def _preprocess(self, image: np.ndarray) -> Any:
        raise NotImplementedError

    def _encode(self, images: Any) -> Any:
        return self.vision(images)

    def _mask_state(self) -> dict[str, Any]:
        state: dict[str, Any] | None = getattr(self, "_masks", None)
        if state is None:
            state = {"base": self._preprocess(self.image), "fills": {}, "partition": None}
            self._masks = state
        return state

    def _prepare_masks(self, batch: Any) -> Any:
        """The batch's kept-region matrix on the device, after readying the sample's soft
        region masks and fill image for the batch's partition and fill (cached)."""
        import torch

        from detectors.scorers.masked import fill_image
        from detectors.scorers.tensor_masks import region_shares

        self._check_image(batch)
        state = self._mask_state()
        if batch.partition is not state["partition"]:
            state["shares"] = region_shares(batch.partition, self.geometry, self.device)
            state["partition"] = batch.partition
        if batch.fill not in state["fills"]:
            fill = self._preprocess(fill_image(self.image, batch.fill))
            state["fills"][batch.fill] = (fill, state["base"] - fill)
        return torch.from_numpy(batch.keep.astype(np.float32)).to(self.device)

    def _chunk_features(self, keep: Any, fill: Any) -> Any:
        # the encoder is done with a chunk's images when it returns: reuse their buffers
        t = self.timings
        images = run_timed(t, "masking", partial(self._blend, reuse=True), keep, fill)
        return run_timed(t, "vision", self._encode, images)

    def _blend(self, keep: Any, fill: Any, *, reuse: bool = False) -> Any:
        """`(b, C, H, W)`: fill + share of kept regions * (base - fill), one fused op, built a
        chunk at a time.  With `reuse` (the caller is done with the previous chunk's images) it
        is written into buffers kept from chunk to chunk: a large fresh tensor is fresh pages
        from the kernel, which cost several times the arithmetic (benchmarks/blend_speed.py)."""
        import torch

        image, diff = self._masks["fills"][fill]
        rows = keep.shape[0]
        share_out, out = self._chunk_buffers(keep, image) if reuse else (None, None)
        share = self._masks["shares"].kept(keep, out=share_out)
        return torch.addcmul(image, share.view(rows, 1, *image.shape[-2:]), diff, out=out)

    def _chunk_buffers(self, keep: Any, image: Any) -> tuple[Any, Any]:
        """`(b, H*W)` and `(b, C, H, W)` buffers for `_blend`, grown when a chunk is larger."""
        rows = keep.shape[0]
        buffers: tuple[Any, Any] | None = self._masks.get("buffers")
        if buffers is None or buffers[1].shape[0] < rows:
            shape = image.shape[1:]
            buffers = (keep.new_empty(rows, shape[-2] * shape[-1]), image.new_empty(rows, *shape))
            self._masks["buffers"] = buffers
        return buffers[0][:rows], buffers[1][:rows]

    def masked_inputs(self, batch: Any) -> Any:
        """`(B, C, H, W)` preprocessed masked images, built in tensor space."""
        return self._blend(self._prepare_masks(batch), batch.fill)
