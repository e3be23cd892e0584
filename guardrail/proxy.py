"""The OpenAI-compatible proxy: `POST /v1/chat/completions` forwarded to the upstream model.

The request is forwarded as the client sent it (the proxy does not judge it) and the answer
(streamed or not) goes back to the client byte for byte; the request's image and the answer's
text are then teed to ingest.  The proxy fails open: if parsing, ingest or the database fail,
the client still gets the upstream's answer and `guardrail_proxy_fail_open_drops_total{reason}`
counts what was not audited, exactly once for every 200 answer that was not handed to ingest.

Memory is bounded in bytes: a request body over `proxy_max_body_bytes` is refused with 413
while it is being read; at most `proxy_max_response_bytes` of an answer are copied for the tee;
teed exchanges waiting for ingest hold at most `proxy_max_pending` exchanges and
`proxy_max_pending_bytes` bytes (beyond either they are dropped with `reason="backlog"`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from guardrail.auditor import image_placeholder
from guardrail.chat import ChatFormatError, chat_input
from guardrail.config import ModelSettings, Settings
from guardrail.ingest import IngestError, IngestRequest, ingest
from guardrail.runtime import Runtime

__all__ = ["MAX_TEE_JSON_VALUES", "TeeBacklog", "add_proxy_routes"]

log = logging.getLogger("guardrail.proxy")

_HOP = {
    b"host",
    b"content-length",
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"accept-encoding",
    b"content-encoding",
    b"upgrade",
    b"te",
    b"trailer",
    b"expect",
    b"proxy-authorization",
    b"proxy-connection",
}
FORCE_HEADER = "x-guardrail-audit"
# A JSON document of N bytes can hold about N/2 values, and parsing it can take 50 times its
# size in Python objects: documents with more values than this are not parsed for the tee.
MAX_TEE_JSON_VALUES = 200_000
# What a parsed JSON value costs beyond its bytes, counted against proxy_max_pending_bytes.
_BYTES_PER_JSON_VALUE = 64
# Bodies up to this size are parsed on the event loop; larger ones on a thread.
_PARSE_ON_LOOP_BYTES = 64 * 1024
_SSE_LINE = re.compile(r"\r\n|\r|\n")  # SSE line ends only (not str.splitlines's U+2028 etc.)
_DIGITS = re.compile(r"[0-9]+")
_QUERY_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))  # printable ASCII stays as sent


class TeeBacklog:
    """Teed exchanges handed to ingest and not finished yet, bounded in count and in bytes.

    Reserved on the event loop, released on the ingest threads (thread-safe)."""

    def __init__(self, *, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._count = 0
        self._bytes = 0

    def reserve(self, size: int) -> bool:
        """Hold `size` bytes for one more exchange; False when either bound would be passed."""
        with self._lock:
            if self._count + 1 > self.max_count or self._bytes + size > self.max_bytes:
                return False
            self._count += 1
            self._bytes += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self._count -= 1
            self._bytes -= size

    @property
    def pending_count(self) -> int:
        return self._count

    @property
    def pending_bytes(self) -> int:
        return self._bytes


class _UnreadableAnswerError(ValueError):
    """An answer whose text cannot be read (not the chat-completions shape)."""


def _json_values(raw: bytes | str) -> int:
    """An upper bound on the number of values in a JSON document (every value but the first
    in a container follows a comma, every key a colon; the same characters in strings only
    make the bound looser)."""
    if isinstance(raw, str):
        return raw.count(",") + raw.count(":") + raw.count("[") + raw.count("{") + 1
    return raw.count(b",") + raw.count(b":") + raw.count(b"[") + raw.count(b"{") + 1


def _json(raw: bytes | str) -> Any:
    if _json_values(raw) > MAX_TEE_JSON_VALUES:
        raise _UnreadableAnswerError(f"more than {MAX_TEE_JSON_VALUES} JSON values")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
        raise _UnreadableAnswerError(f"not JSON: {exc}") from None


def _first_choice(choice: Any) -> bool:
    """Whether `choice` is the answer's first choice (index 0 or no index); raises for a
    choice that is not an object."""
    if not isinstance(choice, dict):
        raise _UnreadableAnswerError("a choice is not a JSON object")
    index = choice.get("index")
    return index is None or (type(index) is int and index == 0)


def _completion_text(raw: bytes) -> str:
    """The assistant text of choice 0 of a (non-streamed) chat completion."""
    data = _json(raw)
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list):
        raise _UnreadableAnswerError("the answer is not an object with a list of choices")
    texts = []
    for choice in choices:
        if _first_choice(choice):
            message = choice.get("message")
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, str):
                raise _UnreadableAnswerError("choice 0 has no message content text")
            texts.append(content)
    if not texts:
        raise _UnreadableAnswerError("the answer has no choice 0")
    return texts[0]


def _sse_text(raw: bytes) -> str:
    """The assistant text of choice 0 carried by a chat-completions event stream."""
    pieces: list[str] = []
    data: list[str] = []
    for line in [*_SSE_LINE.split(raw.decode("utf-8", errors="replace")), ""]:
        if not line:  # a blank line ends an event
            if data:
                _sse_event("\n".join(data), pieces)
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    return "".join(pieces)


def _sse_event(data: str, pieces: list[str]) -> None:
    if data.strip() == "[DONE]":
        return
    event = _json(data)
    if not isinstance(event, dict):
        raise _UnreadableAnswerError("an event is not a JSON object")
    choices = event.get("choices") or []
    if not isinstance(choices, list):
        raise _UnreadableAnswerError("an event's choices are not a list")
    for choice in choices:
        if not _first_choice(choice):
            continue
        delta = choice.get("delta")
        if delta is None:
            continue
        if not isinstance(delta, dict):
            raise _UnreadableAnswerError("a choice's delta is not a JSON object")
        content = delta.get("content")
        if content is None:
            continue
        if not isinstance(content, str):
            raise _UnreadableAnswerError("a delta's content is not text")
        pieces.append(content)


@dataclass(frozen=True, slots=True)
class _ChatRequest:
    """A client's request as far as the tee needs it."""

    body: dict[str, Any] | None  # None when it cannot be teed: `problem` says why
    model: ModelSettings | None
    problem: str | None  # the drop reason, known before the answer arrives
    held_bytes: int  # what keeping it for the tee costs

    @property
    def label(self) -> str:
        return self.model.name if self.model is not None else "other"


def _chat_request(raw: bytes, settings: Settings) -> _ChatRequest:
    values = _json_values(raw)
    if values > MAX_TEE_JSON_VALUES:
        return _ChatRequest(body=None, model=None, problem="request_unreadable", held_bytes=0)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
        return _ChatRequest(body=None, model=None, problem="request_unreadable", held_bytes=0)
    if not isinstance(data, dict):
        return _ChatRequest(body=None, model=None, problem="request_unreadable", held_bytes=0)
    name = data.get("model")
    model = settings.model(name) if isinstance(name, str) else None
    if model is None:
        return _ChatRequest(body=None, model=None, problem="unknown_model", held_bytes=0)
    held = len(raw) + _BYTES_PER_JSON_VALUE * values
    return _ChatRequest(body=data, model=model, problem=None, held_bytes=held)


class _Exchange:
    """One 200 answer on its way to the tee: a copy of at most `limit` bytes, settled once."""

    def __init__(
        self,
        request: _ChatRequest,
        limit: int,
        *,
        streamed: bool,
        request_id: str | None,
        force: bool,
    ) -> None:
        self.request = request
        self.problem = request.problem
        self.limit = limit
        self.streamed = streamed
        self.request_id = request_id
        self.force = force
        self.parts: list[bytes] = []
        self.size = 0
        self.settled = False

    def keep(self, chunk: bytes) -> None:
        if self.problem is not None:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.problem = "response_too_large"
            self.parts = []
        else:
            self.parts.append(chunk)

    def answer(self) -> bytes:
        return b"".join(self.parts)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to be over `limit` bytes (by its
    Content-Length before reading, else while reading)."""
    declared = request.headers.get("content-length", "").strip()
    if _DIGITS.fullmatch(declared) and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(
        {"error": {"type": kind, "message": message}}, status_code=status, headers=headers
    )


def add_proxy_routes(app: FastAPI, runtime: Runtime) -> None:
    """Add `POST /v1/chat/completions`; the tee backlog is `app.state.proxy_backlog`."""
    settings = runtime.settings
    metrics = runtime.metrics
    clients: dict[str, httpx.AsyncClient] = {}
    backlog = TeeBacklog(
        max_count=settings.proxy_max_pending, max_bytes=settings.proxy_max_pending_bytes
    )
    app.state.proxy_backlog = backlog
    metrics.proxy_tee_pending.set_function(lambda: backlog.pending_count)
    metrics.proxy_tee_pending_bytes.set_function(lambda: backlog.pending_bytes)

    def client() -> httpx.AsyncClient:
        if "c" not in clients:
            clients["c"] = httpx.AsyncClient(
                base_url=str(settings.upstream_url).rstrip("/"),
                timeout=httpx.Timeout(300.0, connect=10.0),
            )
        return clients["c"]

    def drop(reason: str) -> None:
        metrics.proxy_fail_open_drops.labels(reason=reason).inc()

    def tee(exchange: _Exchange, answer: bytes) -> None:
        """Hand the exchange to ingest; never raises (fail open)."""
        request, model = exchange.request, exchange.request.model
        try:
            try:
                text = _sse_text(answer) if exchange.streamed else _completion_text(answer)
            except _UnreadableAnswerError:
                drop("response_unreadable")
                return
            if request.body is None or model is None:  # settled as a drop instead (not here)
                drop(request.problem or "request_unreadable")
                return
            auditor = runtime.auditors[model.name]
            parsed = chat_input(request.body, image_placeholder(model.family), model.prompt)
            ingest(
                runtime,
                IngestRequest(
                    model=model.name,
                    prompt=auditor.prompt_for(parsed.prompt),
                    image_bytes=parsed.image_bytes,
                    output=text,
                    request_id=exchange.request_id,
                    metadata={"source": "proxy"},
                    force=exchange.force,
                ),
            )
        except ChatFormatError:
            drop("no_image")
        except IngestError as exc:  # 503: decoding is saturated; else the sample is refused
            drop("ingest_busy" if exc.status == 503 else "rejected")
        except ValueError:  # text the storage cannot encode
            drop("rejected")
        except Exception as exc:  # the database or anything else: traffic must still flow
            log.warning("proxy: could not tee a sample to ingest: %s", str(exc).splitlines()[0])
            drop("ingest_error")

    def run_and_release(size: int, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        finally:
            backlog.release(size)

    def settle(exchange: _Exchange, *, complete: bool) -> None:
        """Count the exchange's outcome once: handed to ingest, or dropped with a reason.
        Never waits: the tee runs on the ingest executor."""
        if exchange.settled:
            return
        exchange.settled = True
        if exchange.problem is not None or not complete:
            drop(exchange.problem or "stream_interrupted")
            return
        answer = exchange.answer()
        exchange.parts = []
        size = exchange.request.held_bytes + len(answer)
        if not backlog.reserve(size):
            drop("backlog")
            return
        try:
            runtime.ingest_executor.submit(run_and_release, size, tee, exchange, answer)
        except RuntimeError:  # the executor is shutting down
            backlog.release(size)
            drop("shutting_down")

    async def settle_later(exchange: _Exchange) -> None:
        settle(exchange, complete=True)

    async def relay(
        response: httpx.Response,
        first: deque[bytes],
        rest: AsyncIterator[bytes],
        exchange: _Exchange | None,
    ) -> AsyncIterator[bytes]:
        complete = False
        try:
            while first:
                chunk = first.popleft()
                if exchange is not None:
                    exchange.keep(chunk)
                yield chunk
            async for chunk in rest:
                if exchange is not None:
                    exchange.keep(chunk)
                yield chunk
            complete = True
        finally:
            if exchange is not None:  # counted first: closing may fail on a dying loop
                settle(exchange, complete=complete)
            await response.aclose()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        """OpenAI-compatible chat completions, forwarded to the configured upstream."""
        if not settings.upstream_url:
            return _error(
                503,
                "upstream_not_configured",
                "the proxy has no upstream: set upstream_url (GUARDRAIL_UPSTREAM_URL)",
                {"Retry-After": "60"},
            )
        limit = settings.proxy_max_body_bytes
        try:
            body = await _read_body(request, limit)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        if body is None:
            # no `Connection: close`: the server reads and discards the rest of the body, so
            # a client still sending gets this answer instead of a reset connection (and an
            # OpenAI client does not retry the upload)
            return _error(
                413,
                "payload_too_large",
                f"the request body is over {limit} bytes (proxy_max_body_bytes); "
                "send a smaller request",
            )
        if len(body) <= _PARSE_ON_LOOP_BYTES:
            chat = _chat_request(body, settings)
        else:
            chat = await asyncio.to_thread(_chat_request, body, settings)
        query = request.scope.get("query_string", b"")
        url = "/v1/chat/completions"
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in _HOP]
        upstream = client().build_request(
            "POST",
            httpx.URL(url, query=quote_from_bytes(query, _QUERY_SAFE).encode()) if query else url,
            content=body,
            # identity: no decompression work (or bombs) in the proxy, chunks stay small
            headers=[*headers, (b"accept-encoding", b"identity")],
        )
        del body  # the upstream request holds it until sent
        started = time.perf_counter()
        try:
            response = await client().send(upstream, stream=True)
        except httpx.HTTPError as exc:
            return _error(
                502,
                "upstream_unavailable",
                f"the upstream model server could not be reached: {type(exc).__name__}: {exc}",
            )
        metrics.proxy_upstream_latency.labels(model=chat.label).observe(
            time.perf_counter() - started
        )
        out_headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP]
        streamed = "text/event-stream" in response.headers.get("content-type", "")
        exchange = None
        if response.status_code == 200:
            exchange = _Exchange(
                chat,
                settings.proxy_max_response_bytes,
                streamed=streamed,
                request_id=request.headers.get("x-request-id"),
                force=request.headers.get(FORCE_HEADER, "").lower() in ("1", "always"),
            )
        rest = response.aiter_bytes()
        first: deque[bytes] = deque()
        if not streamed:  # small answers go back whole, with their Content-Length
            size, whole = 0, True
            try:
                async for chunk in rest:
                    first.append(chunk)
                    size += len(chunk)
                    if size > settings.proxy_max_response_bytes:
                        whole = False
                        break
            except httpx.HTTPError as exc:
                await response.aclose()
                return _error(
                    502,
                    "upstream_unavailable",
                    f"the upstream model server broke off its answer: {type(exc).__name__}: {exc}",
                )
            if whole:
                await response.aclose()
                content = b"".join(first)
                if exchange is not None:
                    exchange.keep(content)
                answer = Response(
                    content=content,
                    status_code=response.status_code,
                    background=BackgroundTask(settle_later, exchange) if exchange else None,
                )
                answer.raw_headers.extend(out_headers)
                return answer
        # streamed, or too large to hold: relayed as it comes
        relayed = StreamingResponse(
            relay(response, first, rest, exchange), status_code=response.status_code
        )
        relayed.raw_headers.extend(out_headers)
        return relayed
