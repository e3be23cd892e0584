"""Ingest and sample status: `POST /v1/samples` (JSON, image as base64), `POST
/v1/samples/upload` (multipart) and `GET /v1/samples/{id}`.

A sample is answered 202 with its id once it and its job are committed, or 200 with `sampled:
false` and the reason; malformed input gets a 4xx that says what is wrong.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, Path, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError, field_validator

from guardrail.logs import request_id_var, sample_id_var
from guardrail.service.http_errors import ApiError
from guardrail.service.ingest import IngestError, IngestRequest, ingest, unsafe_text_reason
from guardrail.service.routes.common import INGEST_ERRORS, READ_ERRORS, checked_id
from guardrail.service.runtime import Runtime
from storage import reads
from storage.models import Sample
from storage.repositories import get_sample

if TYPE_CHECKING:
    from detectors.layout import ImageLayout

__all__ = ["TEXT_ROOM_BYTES", "SampleAccepted", "SampleIn", "add_sample_routes"]

log = logging.getLogger("guardrail.api")

MAX_TEXT_CHARS = 100_000
MAX_TOKEN_IDS = 32_768
MAX_METADATA_DEPTH = 8
MAX_METADATA_KEYS = 256
MAX_METADATA_BYTES = 16 * 1024
TEXT_ROOM_BYTES = 4 * 2**20  # what a request needs beyond its base64 image
REQUEST_ID_PATTERN = r"^[!-~]{1,128}$"  # visible ASCII, no spaces

TokenId = Annotated[int, Field(ge=0, lt=2**31)]


def _metadata_problem(metadata: dict[str, Any]) -> str | None:
    """Why `metadata` cannot be stored, or None; walks iteratively (no recursion limit)."""
    stack: list[tuple[Any, int, str]] = [(metadata, 1, "metadata")]
    keys = 0
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, dict):
            if depth > MAX_METADATA_DEPTH:
                return f"is nested deeper than {MAX_METADATA_DEPTH} levels (at {where})"
            for key, value in node.items():
                keys += 1
                if keys > MAX_METADATA_KEYS:
                    return f"has more than {MAX_METADATA_KEYS} keys in all"
                if not isinstance(key, str):
                    return f"has a key that is not a string (at {where})"
                if reason := unsafe_text_reason(key):
                    return f"has a key that {reason} (at {where})"
                stack.append((value, depth + 1, f"{where}.{key[:40]}"))
        elif isinstance(node, list):
            if depth > MAX_METADATA_DEPTH:
                return f"is nested deeper than {MAX_METADATA_DEPTH} levels (at {where})"
            keys += len(node)  # list items count as keys: the walk stays bounded
            if keys > MAX_METADATA_KEYS:
                return f"has more than {MAX_METADATA_KEYS} keys and list items in all"
            stack.extend((value, depth + 1, f"{where}[{i}]") for i, value in enumerate(node))
        elif isinstance(node, str):
            if reason := unsafe_text_reason(node):
                return f"has a value that {reason} (at {where})"
        elif isinstance(node, float):
            if not math.isfinite(node):
                return f"has a number that is not finite (at {where}); JSON has no NaN or Infinity"
        elif node is not None and not isinstance(node, int):  # bool is an int
            return f"has a value of type {type(node).__name__} (at {where}); give JSON values"
    try:
        size = len(json.dumps(metadata, ensure_ascii=False, allow_nan=False).encode())
    except ValueError as exc:
        return f"cannot be stored as JSON: {exc}"
    if size > MAX_METADATA_BYTES:
        return f"is {size} bytes as JSON, over the limit of {MAX_METADATA_BYTES}"
    return None


class SampleIn(BaseModel):
    """A model output to audit."""

    model_config = {"extra": "forbid"}

    model: str = Field(
        min_length=1, max_length=128, description="a model name from the configuration"
    )
    prompt: str = Field(
        max_length=MAX_TEXT_CHARS,
        description="the prompt as sent (with the image placeholder, or "
        "the user text when the model has a prompt template)",
    )
    output: str | None = Field(
        default=None, max_length=MAX_TEXT_CHARS, description="the generated text"
    )
    token_ids: list[TokenId] | None = Field(
        default=None, max_length=MAX_TOKEN_IDS, description="the generated token ids"
    )
    image_base64: str = Field(description="the image, base64 (PNG, JPEG or WebP; data URL ok)")
    more_images_base64: list[str] = Field(
        default_factory=list,
        max_length=15,
        description="the images after the first, in prompt order, for a model that takes "
        "several in one prompt (Qwen2.5-VL; at most max_images_per_sample in all): audited in "
        "one search over the regions of all of them.  The prompt holds one image placeholder "
        "per image, or is the user text when the model has a prompt template (its image "
        "stands for every image); all images share the request body limit "
        "(max_request_bytes, by default room for one image of max_image_bytes)",
    )
    request_id: str | None = Field(
        default=None,
        pattern=REQUEST_ID_PATTERN,
        description="the caller's id for the request: 1-128 visible ASCII characters",
    )
    response_id: str | None = Field(
        default=None,
        pattern=REQUEST_ID_PATTERN,
        description="the model server's id for its answer (chatcmpl-...): 1-128 visible "
        "ASCII characters",
    )
    choice_index: int | None = Field(
        default=None, ge=0, lt=2**31, description="which choice of the answer this output is"
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description=f"a JSON object: at most {MAX_METADATA_DEPTH} levels deep, "
        f"{MAX_METADATA_KEYS} keys and {MAX_METADATA_BYTES} bytes",
    )
    audit: bool = Field(default=False, description="always audit this one")

    @field_validator("model", "prompt", "output", "request_id", "response_id", mode="before")
    @classmethod
    def _storable_text(cls, value: object) -> object:
        if isinstance(value, str) and (reason := unsafe_text_reason(value)):
            raise ValueError(reason)
        return value

    @field_validator("metadata")
    @classmethod
    def _storable_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        if reason := _metadata_problem(value):
            raise ValueError(f"metadata {reason}")
        return value


class SampleAccepted(BaseModel):
    sampled: bool
    id: str | None = None
    status: str | None = None
    reason: str | None = None


def _decode_base64(data: str, field: str = "image_base64") -> bytes:
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, f"{field} is not valid base64: {exc}") from None


def _form_error(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message}])


def _form_json(field: str, raw: str | None, expected: str) -> Any:
    """A multipart field that holds JSON; a 422 naming the field when it does not parse."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except RecursionError:
        raise _form_error(field, f"must be {expected}; it is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise _form_error(field, f"must be {expected}: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Correlation:
    request_id: str | None
    traceparent: str | None


async def _correlation(  # async: no blocking work, so no thread hop per request
    x_request_id: Annotated[
        str | None,
        Header(description="the caller's request id (1-128 visible ASCII characters)"),
    ] = None,
    traceparent: Annotated[
        str | None, Header(description="W3C trace context; stored when valid, else ignored")
    ] = None,
) -> _Correlation:
    """The correlation headers of an ingest request: a malformed X-Request-Id is refused
    (422, as the body field), a malformed traceparent ignored (W3C: start a new trace)."""
    from guardrail.service.proxy import valid_request_id, valid_traceparent

    if x_request_id is not None and valid_request_id(x_request_id) is None:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("header", "x-request-id"),
                    "msg": "must be 1-128 visible ASCII characters",
                }
            ]
        )
    return _Correlation(x_request_id, valid_traceparent(traceparent))


def add_sample_routes(app: FastAPI, runtime: Runtime, auth: list[Any]) -> None:
    """Ingest (JSON and multipart) and a sample's status, guarded by `auth`."""
    settings = runtime.settings

    async def ingest_json(
        body: SampleIn,
        image_bytes: bytes,
        force: bool,
        context: _Correlation,
        more_images: tuple[bytes, ...] = (),
    ) -> JSONResponse:
        request = IngestRequest(
            more_images=more_images,
            model=body.model,
            prompt=body.prompt,
            image_bytes=image_bytes,
            output=body.output,
            token_ids=body.token_ids,
            request_id=body.request_id or context.request_id,
            response_id=body.response_id,
            traceparent=context.traceparent,
            choice_index=body.choice_index,
            metadata=body.metadata,
            force=force or body.audit,
        )
        if body.request_id is not None and request_id_var.get() is None:
            request_id_var.set(body.request_id)  # the request's log lines name it
        loop = asyncio.get_running_loop()
        log_context = contextvars.copy_context()  # the ingest thread logs with the request's ids
        try:
            answer = await loop.run_in_executor(
                runtime.ingest_executor, log_context.run, ingest, runtime, request
            )
        except IngestError as exc:
            retry = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
            raise ApiError(exc.status, str(exc), error_type=exc.error_type, headers=retry) from None
        if answer.get("id"):
            sample_id_var.set(answer["id"])  # uvicorn's access line for this request names it
        return JSONResponse(answer, status_code=202 if answer["sampled"] else 200)

    @app.post(
        "/v1/samples",
        dependencies=auth,
        status_code=202,
        response_model=SampleAccepted,
        responses={200: {"description": "not sampled", "model": SampleAccepted}, **INGEST_ERRORS},
    )
    async def post_sample(
        body: SampleIn,
        context: Annotated[_Correlation, Depends(_correlation)],
        x_guardrail_audit: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        """Offer a model output (JSON, image as base64) for audit.  `X-Request-Id` and a W3C
        `traceparent` header are stored with the sample (`request_id` in the body wins)."""
        image_bytes = _decode_base64(body.image_base64)
        more = tuple(
            _decode_base64(b, f"more_images_base64[{n}]")
            for n, b in enumerate(body.more_images_base64)
        )
        return await ingest_json(
            body, image_bytes, (x_guardrail_audit or "").lower() in ("1", "always"), context, more
        )

    @app.post(
        "/v1/samples/upload",
        dependencies=auth,
        status_code=202,
        response_model=SampleAccepted,
        responses={200: {"description": "not sampled", "model": SampleAccepted}, **INGEST_ERRORS},
    )
    async def post_sample_upload(
        image: Annotated[UploadFile, File(description="the image file")],
        model: Annotated[str, Form()],
        prompt: Annotated[str, Form()],
        output: Annotated[str | None, Form()] = None,
        token_ids: Annotated[str | None, Form(description="JSON list of ints")] = None,
        request_id: Annotated[str | None, Form()] = None,
        metadata: Annotated[str | None, Form(description="JSON object")] = None,
        response_id: Annotated[str | None, Form()] = None,
        choice_index: Annotated[int | None, Form()] = None,
        x_guardrail_audit: Annotated[str | None, Header()] = None,
        context: Annotated[_Correlation | None, Depends(_correlation)] = None,
    ) -> JSONResponse:
        """Offer a model output as a multipart upload (the same limits as the JSON route)."""
        fields = {
            "model": model,
            "prompt": prompt,
            "output": output,
            "token_ids": _form_json("token_ids", token_ids, "a JSON list of integers"),
            "image_base64": "",
            "request_id": request_id,
            "metadata": _form_json("metadata", metadata, "a JSON object") or {},
            "response_id": response_id,
            "choice_index": choice_index,
        }
        try:
            body = SampleIn.model_validate(fields)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
            raise RequestValidationError(errors) from None
        # bounded: one byte over the limit is enough for ingest to answer 413
        data = await image.read(settings.max_image_bytes + 1)
        force = (x_guardrail_audit or "").lower() in ("1", "always")
        return await ingest_json(body, data, force, context or _Correlation(None, None))

    @app.get("/v1/samples/{sample_id}", dependencies=auth, responses=READ_ERRORS)
    def get_sample_status(
        sample_id: Annotated[str, Path(description="32 lowercase hexadecimal characters")],
    ) -> dict[str, Any]:
        """A sample's status, flagged tokens and verdicts with their numbers."""
        checked_id("sample", sample_id)
        with runtime.sessions() as session:
            sample = get_sample(session, sample_id)
            if sample is None:
                raise ApiError(404, f"no sample {sample_id!r}")
            view = _sample_view(sample)
            job = reads.latest_job(session, sample_id)
            if job is not None:
                view["job"] = {
                    "status": job.status,
                    "attempts": job.attempts,
                    "error": job.error,
                    "failure_reason": job.failure_reason,
                }
            return view


def _correlation_view(sample: Sample) -> dict[str, Any]:
    return {
        "request_id": sample.request_id,
        "response_id": sample.response_id,
        "traceparent": sample.traceparent,
        "choice_index": sample.choice_index,
    }


def _stored_layout(sample: Sample) -> ImageLayout | None:
    """The layout of a sample of several images, or None (one image, or a stored layout that
    does not read back: the view shows it as stored and counts no images)."""
    if not sample.image_layout:
        return None
    from detectors.layout import ImageLayout

    try:
        return ImageLayout.from_dict(sample.image_layout)
    except ValueError as exc:
        log.warning("sample %s: its image layout is unreadable: %s", sample.id, exc)
        return None


def _images_of(layout: ImageLayout | None, record: Any) -> dict[str, Any]:
    """For a sample of several images: which of them (0-based, in prompt order) the compact
    set's regions lie in."""
    if layout is None:
        return {}
    from storage.repositories import label_map

    return {"compact_set_images": layout.images_of(label_map(record), record.compact_set)}


def _sample_view(sample: Sample) -> dict[str, Any]:
    layout = _stored_layout(sample)
    # several images: the stored image is their canvas, `image_layout` says where each is
    # (a count of None: a stored layout that does not read back)
    image_count = (layout.n_images if layout else None) if sample.image_layout else 1
    tokens = []
    for t in sample.tokens:
        a, v = t.attribution, t.verdict
        tokens.append(
            {
                "position": t.position,
                "token_id": t.token_id,
                "word": t.word,
                "category": t.category,
                "verdict": None
                if v is None
                else {
                    "label": v.label,
                    "hallucination_score": v.hallucination_score,
                    "prior_score": v.prior_score,
                    "reason": v.reason,
                    **v.numbers,
                    # provenance (None on rows stored before revision 0007)
                    "detector": v.detector or v.numbers.get("detector"),
                    "detector_version": v.detector_version,
                    "thresholds_id": v.thresholds_id,
                },
                "attribution": None
                if a is None
                else {
                    "compact_set": a.compact_set,
                    **_images_of(layout, a),
                    "order": a.order,
                    "forward_passes": a.forward_passes,
                    "seconds": a.seconds,
                    "stopped_by": a.stopped_by,
                    "search": a.search,
                    "scorer": a.scorer_name,
                    "partition": a.partition_method,
                    "fill": a.fill,
                    "search_version": a.search_version,
                    "weights": None
                    if a.weight_insight is None
                    else [a.weight_insight, a.weight_necessity],
                },
            }
        )
    return {
        "id": sample.id,
        "model": sample.model,
        "status": sample.status.value,
        "received_at": sample.received_at.isoformat(),
        **_correlation_view(sample),
        "image_sha256": sample.image_sha256,
        "image_size": [sample.image_width, sample.image_height],
        "image_count": image_count,
        "image_layout": sample.image_layout,
        "output": sample.generated_text,
        "tokens": tokens,
    }
