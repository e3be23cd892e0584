"""Accepting a sample: validate, sample, and store it with its job in one transaction.

The image is checked cheaply for every request (format from its magic bytes, size from its
header, geometry at the audit resolution); only a sampled one is decoded, in a decoder child
process (`guardrail.service.decoders`) under the process's pixel budget, and stored as its
canonical image (`guardrail.service.canonical`): upright 8-bit RGB PNG at most the model's
input size.  The sample keeps the SHA-256 and size of the
image as sent, and the sampling key is that digest.

Samples accepted by concurrent requests are committed together (`storage.group_commit`): the
commit (an fsync on SQLite) is paid once per batch, not once per sample, and a request is
answered only once its own sample is durable.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from guardrail.config import ModelSettings, Settings
from guardrail.errors import PermanentError, RetryableError
from guardrail.service.auditor import image_placeholder
from guardrail.service.canonical import (
    CanonicalImage,
    ImageLimits,
    audit_resolution,
    pixel_budget,
)
from guardrail.service.images import DecodeBusyError, ImageRejectedError, image_header, sniff_format
from guardrail.service.runtime import Runtime
from guardrail.service.sampling import request_key
from storage.repositories import NewSample

__all__ = ["IngestError", "IngestRequest", "ingest", "max_images", "unsafe_text_reason"]


_UNSAFE_CHARS = re.compile("[\x00\ud800-\udfff]")


def unsafe_text_reason(text: str) -> str | None:
    """Why `text` cannot be stored as text (a NUL or a lone surrogate), or None."""
    found = _UNSAFE_CHARS.search(text)
    if found is None:
        return None
    char = found.group()
    what = "a NUL character" if char == "\x00" else f"a lone surrogate (U+{ord(char):04X})"
    return (
        f"contains {what} at position {found.start()}; text must be valid Unicode "
        "without NUL characters"
    )


class IngestError(PermanentError):
    """A sample that cannot be accepted; `status` is the HTTP status that says why,
    `error_type` the error contract's kind when more specific than the status's (None
    otherwise), `retry_after` the seconds to wait before a retry (503 only)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.retry_after = retry_after


class IngestBusyError(IngestError, RetryableError):
    """Ingest could not decode the image in time (503, with `retry_after`): retry later."""


def _image_error(exc: ImageRejectedError, which: str = "image") -> IngestError:
    if isinstance(exc, DecodeBusyError):
        return IngestBusyError(
            exc.status, f"{which}: {exc}", error_type=exc.error_type, retry_after=exc.retry_after
        )
    return IngestError(exc.status, f"{which}: {exc}", error_type=exc.error_type)


def max_images(model: ModelSettings, settings: Settings) -> int:
    """The most images one sample of `model` may hold: 1 for a family audited on one image,
    else the family's limit capped by `max_images_per_sample`."""
    from detectors.scorers.families import family_named

    if model.scorer == "remote":
        return 1  # the remote scorer sends one image
    return max(1, min(family_named(model.family).max_images, settings.max_images_per_sample))


def _check_image_count(runtime: Runtime, model: ModelSettings, n: int) -> None:
    limit = max_images(model, runtime.settings)
    if n <= limit:
        return
    if limit == 1:
        raise IngestError(
            422, f"{n} images: model {model.name!r} ({model.family}) is audited on one image"
        )
    raise IngestError(
        422,
        f"{n} images: at most {limit} are audited in one sample of model {model.name!r} "
        "(max_images_per_sample)",
    )


def _which(n: int, count: int) -> str:
    return "image" if count == 1 else f"image {n} of {count}"


@dataclass(frozen=True, slots=True)
class IngestRequest:
    model: str
    prompt: str
    image_bytes: bytes
    output: str | None = None
    token_ids: list[int] | None = None
    request_id: str | None = None
    response_id: str | None = None  # the upstream's answer id (chatcmpl-...)
    traceparent: str | None = None  # W3C trace context, validated by the caller
    choice_index: int | None = None  # which choice of the answer (n > 1)
    # the digest the sampling key uses instead of the image's (a fetched URL's: the sampling
    # decision was taken on it before fetching)
    image_key: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    force: bool = False
    # the images after the first, for a model family that takes several in one prompt
    more_images: tuple[bytes, ...] = ()


def ingest(runtime: Runtime, request: IngestRequest) -> dict[str, Any]:
    """`{"sampled": True, "id": ...}` once the sample and its job are committed, or
    `{"sampled": False, "reason": ...}`.

    Raises:
        IngestError: unknown model (404), no output (422), image over max_image_bytes or
            max_image_pixels (413), not PNG/JPEG/WebP (415), degenerate geometry, truncated
            or corrupt (422), a prompt without the image placeholder (422), no decode capacity
            free in time (503, with `retry_after`).
    """
    settings, m = runtime.settings, runtime.metrics
    model = settings.model(request.model)
    if model is None:
        m.samples_skipped.labels(model="unknown", reason="unknown_model").inc()
        known = ", ".join(x.name for x in settings.models)
        raise IngestError(404, f"model {request.model!r} is not configured (known: {known})")
    m.samples_received.labels(model=model.name).inc()
    if request.output is None and request.token_ids is None:
        raise IngestError(422, "give the generated text (output) or its token_ids")
    for name, text in (("prompt", request.prompt), ("output", request.output or "")):
        # the API refuses these at its edge; the proxy's tee comes here directly
        if reason := unsafe_text_reason(text):
            raise IngestError(422, f"{name}: {reason}")
    images = (request.image_bytes, *request.more_images)
    _check_image_count(runtime, model, len(images))
    limits = ImageLimits(
        max_pixels=settings.max_image_pixels,
        min_side=settings.min_image_side,
        max_aspect_ratio=settings.max_image_aspect_ratio,
    )
    resolution = audit_resolution(model)
    for n, data in enumerate(images, start=1):
        which = _which(n, len(images))
        if len(data) > settings.max_image_bytes:
            raise IngestError(
                413,
                f"{which}: {len(data)} bytes, over the {settings.max_image_bytes} "
                "bytes allowed (max_image_bytes)",
                error_type="payload_too_large",
            )
        try:  # cheap checks on every request: magic bytes, header, geometry (nothing decoded)
            fmt = sniff_format(data)
            width, height = image_header(data, fmt)
            limits.check(width, height, resolution.target_size(width, height), model.n_regions)
        except ImageRejectedError as exc:
            raise _image_error(exc, which) from None
    auditor = runtime.auditors[model.name]
    placeholder = image_placeholder(model.family)
    found = auditor.prompt_for(request.prompt, len(images)).count(placeholder)
    if not found:
        raise IngestError(
            422,
            f"prompt: holds no {placeholder!r} placeholder and model {model.name!r} has no "
            "prompt template",
        )
    # a local model's prompt takes exactly one placeholder per image (the remote scorer sends
    # the text without them): refused here, not stored to fail its audit
    if found != len(images) and model.scorer != "remote":
        raise IngestError(
            422,
            f"prompt: holds {found} {placeholder!r} placeholders for {len(images)} "
            f"image{'s' if len(images) > 1 else ''} (one per image, in order)",
        )
    digests = [hashlib.sha256(data).hexdigest() for data in images]
    # several images: the digest of their digests, in order
    digest = (
        digests[0] if len(images) == 1 else hashlib.sha256(",".join(digests).encode()).hexdigest()
    )
    key = request_key(
        model.name,
        request.request_id,
        request.image_key or digest,
        request.prompt,
        request.output or "",
    )
    decision = runtime.sampler.decide(model.name, key, force=request.force)
    if not decision.sampled:
        m.samples_skipped.labels(model=model.name, reason=decision.reason).inc()
        return {"sampled": False, "reason": decision.reason}
    budget = pixel_budget(settings.ingest_decode_pixels or settings.max_image_pixels)
    layout = None
    canonical: list[CanonicalImage] = []
    for n, data in enumerate(images, start=1):
        try:
            canonical.append(
                runtime.decoders.canonical(
                    data,
                    limits=limits,
                    resolution=resolution,
                    n_regions=model.n_regions,
                    budget=budget,
                    wait_seconds=settings.ingest_decode_wait_seconds,
                )
            )
        except ImageRejectedError as exc:
            raise _image_error(exc, _which(n, len(images))) from None
    image = canonical[0]
    if len(canonical) > 1:  # one canvas, audited in one search over all the images
        try:
            image, layout = runtime.decoders.canvas(
                canonical,
                min_side=settings.min_image_side,
                n_regions=model.n_regions,
                budget=budget,
                wait_seconds=settings.ingest_decode_wait_seconds,
                max_pixels=settings.max_image_pixels,
            )
        except ImageRejectedError as exc:
            raise _image_error(exc, "images") from None
    sample_id = runtime.sample_writer.submit(
        NewSample(
            sample={
                "model": model.name,
                "image_sha256": digest,
                "image_size": (image.original_width, image.original_height),
                "image_layout": layout.as_dict() if layout is not None else None,
                "generated_text": request.output or "",
                "token_ids": request.token_ids,
                "request_id": request.request_id,
                "response_id": request.response_id,
                "traceparent": request.traceparent,
                "choice_index": request.choice_index,
                "metadata": request.metadata,
                "prompt": request.prompt if settings.store_raw else None,
                "image_data": image.png if settings.store_raw else None,
            },
            max_attempts=settings.max_attempts,
            image_data=image.png,
            prompt=request.prompt,
        )
    )
    m.samples_sampled.labels(model=model.name).inc()
    return {"sampled": True, "id": sample_id, "status": "queued", "reason": decision.reason}
