"""Accepting a sample: validate, sample, and store it with its job in one transaction."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from guardrail.auditor import image_placeholder
from guardrail.images import decode_image
from guardrail.runtime import Runtime
from guardrail.sampling import request_key
from storage import queue
from storage.repositories import add_sample

__all__ = ["IngestError", "IngestRequest", "ingest"]


class IngestError(ValueError):
    """A sample that cannot be accepted; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class IngestRequest:
    model: str
    prompt: str
    image_bytes: bytes
    output: str | None = None
    token_ids: list[int] | None = None
    request_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    force: bool = False


def ingest(runtime: Runtime, request: IngestRequest) -> dict[str, Any]:
    """`{"sampled": True, "id": ...}` once the sample and its job are committed, or
    `{"sampled": False, "reason": ...}`.

    Raises:
        IngestError: unknown model (404), no output (422), image too large (413) or not
            decodable (422), a prompt without the image placeholder (422).
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
    if len(request.image_bytes) > settings.max_image_bytes:
        raise IngestError(413, f"the image is over {settings.max_image_bytes} bytes")
    try:
        image = decode_image(request.image_bytes)
    except ValueError as exc:
        raise IngestError(422, f"image: {exc}") from None
    auditor = runtime.auditors[model.name]
    placeholder = image_placeholder(model.family)
    if placeholder not in auditor.prompt_for(request.prompt):
        raise IngestError(
            422,
            f"prompt: holds no {placeholder!r} placeholder and model {model.name!r} has no "
            "prompt template",
        )
    digest = hashlib.sha256(request.image_bytes).hexdigest()
    key = request_key(model.name, request.request_id, digest, request.prompt, request.output or "")
    decision = runtime.sampler.decide(model.name, key, force=request.force)
    if not decision.sampled:
        m.samples_skipped.labels(model=model.name, reason=decision.reason).inc()
        return {"sampled": False, "reason": decision.reason}
    with runtime.sessions.begin() as session:
        sample = add_sample(
            session,
            model=model.name,
            image_sha256=digest,
            image_size=(int(image.shape[1]), int(image.shape[0])),
            generated_text=request.output or "",
            token_ids=request.token_ids,
            request_id=request.request_id,
            metadata=request.metadata,
            prompt=request.prompt if settings.store_raw else None,
            image_data=request.image_bytes if settings.store_raw else None,
        )
        queue.enqueue(
            session,
            sample.id,
            max_attempts=settings.max_attempts,
            image_data=request.image_bytes,
            prompt=request.prompt,
        )
        sample_id = sample.id
    m.samples_sampled.labels(model=model.name).inc()
    return {"sampled": True, "id": sample_id, "status": "queued", "reason": decision.reason}
