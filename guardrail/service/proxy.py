"""The OpenAI-compatible proxy: every path under `/v1` forwarded to the upstream model server.

Requests go upstream as the client sent them (method, path, query, body and headers, less the
hop-by-hop ones and the guardrail's own `X-Guardrail-*`), and answers come back byte for byte
with their headers (a compressed answer stays compressed, with its `Content-Encoding`).  The
guardrail's own routes (`/v1/samples`, `/v1/audits`, `/v1/reports`, `/healthz`, `/metrics`...)
take precedence; only `POST /v1/chat/completions` is teed to the audit
(`guardrail.service.tee`), after the answer went back.  The proxy fails open: if parsing,
ingest or the database fail, the client still gets the upstream's answer and
`guardrail_proxy_fail_open_drops_total{reason}` counts what was not audited.

An `upstream_url` given with or without its `/v1` reaches the same paths.  Connecting is
bounded by `proxy_connect_timeout_seconds` and each wait for the upstream by
`proxy_read_timeout_seconds`; beyond either, before the answer started, the client gets a 504.

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
from starlette.routing import Match

from guardrail.config import ModelSettings, Settings
from guardrail.service.answers import MAX_TEE_JSON_VALUES, json_values
from guardrail.service.image_fetch import ImageFetcher
from guardrail.service.metrics import PROXY_ROUTES
from guardrail.service.runtime import Runtime
from guardrail.service.tee import Tee, TeedExchange

__all__ = [
    "CHAT_PATH",
    "MAX_TEE_JSON_VALUES",
    "TeeBacklog",
    "add_proxy_routes",
    "route_label",
    "upstream_base",
    "valid_request_id",
    "valid_traceparent",
]

log = logging.getLogger("guardrail.proxy")

CHAT_PATH = "/v1/chat/completions"
_HOP = {
    b"host",
    b"content-length",
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"upgrade",
    b"te",
    b"trailer",
    b"expect",
    b"proxy-authorization",
    b"proxy-connection",
}
# uvicorn writes its own `date` and `server` on every answer: the upstream's would be doubled
_SERVER_OWN = {b"date", b"server"}
_GUARDRAIL_HEADERS = b"x-guardrail-"
FORCE_HEADER = "x-guardrail-audit"
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
_ROUTES = frozenset(PROXY_ROUTES)
# What a parsed JSON value costs beyond its bytes, counted against proxy_max_pending_bytes.
_BYTES_PER_JSON_VALUE = 64
# Bodies up to this size are parsed on the event loop; larger ones on a thread.
_PARSE_ON_LOOP_BYTES = 64 * 1024
_DIGITS = re.compile(r"[0-9]+")
_QUERY_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))  # printable ASCII stays as sent
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_REQUEST_ID = re.compile(r"[!-~]{1,128}")  # visible ASCII, no spaces (as the samples API)


def route_label(path: str) -> str:
    """The bounded `route` label of a path under /v1: `chat_completions`, the first segment
    when it is a known OpenAI endpoint (`models`, `completions`, `embeddings`...), else
    `other`."""
    rest = path.removeprefix("/v1/")
    if rest.rstrip("/") == "chat/completions":
        return "chat_completions"
    first = rest.split("/", 1)[0]
    return first if first in _ROUTES else "other"


def upstream_base(url: str) -> str:
    """The upstream's root: `upstream_url` without a trailing slash or `/v1` (the client's
    paths start with /v1 and are sent as they are)."""
    base = url.rstrip("/")
    return base.removesuffix("/v1") if base.endswith("/v1") else base


def valid_traceparent(value: str | None) -> str | None:
    """A W3C `traceparent` header value when it is valid (lowercase hex, version not `ff`,
    trace and parent ids not all zeros; fields a later version appends are dropped), else
    None."""
    if not value:
        return None
    value = value.strip()
    found = _TRACEPARENT.match(value)
    if found is None:
        return None
    version, trace_id, parent_id, _ = found.groups()
    rest = value[found.end() :]
    if version == "ff" or (version == "00" and rest) or (rest and not rest.startswith("-")):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return found.group(0)


def valid_request_id(value: str | None) -> str | None:
    """The client's `X-Request-Id` when it is 1-128 visible ASCII characters, else None."""
    return value if value is not None and _REQUEST_ID.fullmatch(value) else None


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


@dataclass(frozen=True, slots=True)
class _ChatRequest:
    """A client's chat request as far as the tee needs it."""

    body: dict[str, Any] | None  # None when it cannot be teed: `problem` says why
    model: ModelSettings | None
    problem: str | None  # the drop reason, known before the answer arrives
    held_bytes: int  # what keeping it for the tee costs

    @property
    def label(self) -> str:
        return self.model.name if self.model is not None else "other"


def _chat_request(raw: bytes, settings: Settings) -> _ChatRequest:
    values = json_values(raw)
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
    """One 200 chat answer on its way to the tee: a copy of at most `limit` bytes, settled
    once."""

    def __init__(
        self,
        request: _ChatRequest,
        limit: int,
        *,
        streamed: bool,
        content_encoding: str,
        request_id: str | None,
        traceparent: str | None,
        force: bool,
    ) -> None:
        self.request = request
        self.problem = request.problem
        self.limit = limit
        self.streamed = streamed
        self.content_encoding = content_encoding
        self.request_id = request_id
        self.traceparent = traceparent
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


def _timeout_message(exc: httpx.TimeoutException, settings: Settings) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return (
            "the upstream model server could not be connected to within "
            f"{settings.proxy_connect_timeout_seconds} s (proxy_connect_timeout_seconds)"
        )
    if isinstance(exc, httpx.PoolTimeout):
        return (
            "no connection to the upstream model server came free within "
            f"{settings.proxy_connect_timeout_seconds} s (proxy_connect_timeout_seconds)"
        )
    return (
        f"the upstream model server did not answer within {settings.proxy_read_timeout_seconds}"
        " s (proxy_read_timeout_seconds)"
    )


def add_proxy_routes(app: FastAPI, runtime: Runtime) -> None:
    """Add `POST /v1/chat/completions` (teed) and every other path under /v1 (forwarded).

    Call it after the app's own routes: a path under /v1 that one of them serves for another
    method answers 405, one under their prefixes that none serves 404, and neither is
    forwarded.  The tee backlog is `app.state.proxy_backlog`."""
    settings = runtime.settings
    metrics = runtime.metrics
    clients: dict[str, httpx.AsyncClient] = {}
    backlog = TeeBacklog(
        max_count=settings.proxy_max_pending, max_bytes=settings.proxy_max_pending_bytes
    )
    app.state.proxy_backlog = backlog
    metrics.proxy_tee_pending.set_function(lambda: backlog.pending_count)
    metrics.proxy_tee_pending_bytes.set_function(lambda: backlog.pending_bytes)
    fetcher = ImageFetcher(
        enabled=settings.image_url_fetch,
        allowed_hosts=settings.image_url_allowed_hosts,
        max_bytes=settings.max_image_bytes,
        timeout_seconds=settings.image_url_timeout_seconds,
        max_redirects=settings.image_url_max_redirects,
        count=lambda outcome: metrics.image_fetches.labels(outcome=outcome).inc(),
    )
    tee = Tee(runtime, fetcher)
    own_routes = list(app.router.routes)
    own_prefixes = {
        path.removeprefix("/v1/").split("/", 1)[0]
        for path in (getattr(r, "path", "") for r in own_routes)
        if path.startswith("/v1/")
    }

    def client() -> httpx.AsyncClient:
        if "c" not in clients:
            upstream = httpx.AsyncClient(
                base_url=upstream_base(str(settings.upstream_url)),
                timeout=httpx.Timeout(
                    settings.proxy_read_timeout_seconds,
                    connect=settings.proxy_connect_timeout_seconds,
                    pool=settings.proxy_connect_timeout_seconds,
                ),
            )
            upstream.headers.clear()  # no User-Agent, Accept or Accept-Encoding of httpx's own
            clients["c"] = upstream
        return clients["c"]

    def answered(route: str, status: int) -> None:
        metrics.proxy_requests.labels(route=route, code=f"{status // 100}xx").inc()

    def run_and_release(size: int, exchange: TeedExchange) -> None:
        try:
            tee(exchange)
        finally:
            backlog.release(size)

    def settle(exchange: _Exchange, *, complete: bool) -> None:
        """Count the exchange's outcome once: handed to the tee, or dropped with a reason.
        Never waits: the tee runs on the tee executor."""
        if exchange.settled:
            return
        exchange.settled = True
        request = exchange.request
        if exchange.problem is not None or not complete:
            tee.drop(exchange.problem or "stream_interrupted")
            return
        if request.body is None or request.model is None:  # a problem was set (not here)
            tee.drop("request_unreadable")
            return
        answer = exchange.answer()
        exchange.parts = []
        size = request.held_bytes + len(answer)
        if not backlog.reserve(size):
            tee.drop("backlog")
            return
        teed = TeedExchange(
            body=request.body,
            model=request.model,
            answer=answer,
            content_encoding=exchange.content_encoding,
            streamed=exchange.streamed,
            request_id=exchange.request_id,
            traceparent=exchange.traceparent,
            force=exchange.force,
        )
        try:
            runtime.tee_executor.submit(run_and_release, size, teed)
        except RuntimeError:  # the executor is shutting down
            backlog.release(size)
            tee.drop("shutting_down")

    async def settle_later(exchange: _Exchange) -> None:
        settle(exchange, complete=True)

    async def relay(
        response: httpx.Response,
        first: deque[bytes],
        rest: AsyncIterator[bytes],
        exchange: _Exchange | None,
        done: Callable[[], None],
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
            done()
            await response.aclose()

    def not_forwarded(request: Request) -> Response | None:
        """405 or 404 for a path under one of the guardrail's own /v1 prefixes."""
        path = request.scope["path"]
        if path.removeprefix("/v1/").split("/", 1)[0] not in own_prefixes:
            return None
        allowed: set[str] = set()
        for route in own_routes:
            match, _ = route.matches(request.scope)
            if match != Match.NONE:
                allowed |= set(getattr(route, "methods", None) or ())
        if allowed:
            return _error(
                405,
                "method_not_allowed",
                f"{request.method} is not allowed here (allowed: {', '.join(sorted(allowed))})",
                {"Allow": ", ".join(sorted(allowed))},
            )
        return _error(404, "not_found", "there is no endpoint at this path (see /docs)")

    async def forward(request: Request) -> Response:
        path = request.scope["path"]
        route = route_label(path)
        refused = not_forwarded(request)
        if refused is not None:
            return refused
        if not settings.upstream_url:
            answered(route, 503)
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
            answered(route, 413)
            # no `Connection: close`: the server reads and discards the rest of the body, so
            # a client still sending gets this answer instead of a reset connection (and an
            # OpenAI client does not retry the upload)
            return _error(
                413,
                "payload_too_large",
                f"the request body is over {limit} bytes (proxy_max_body_bytes); "
                "send a smaller request",
            )
        teed = route == "chat_completions" and request.method == "POST"
        chat = None
        if teed:
            if len(body) <= _PARSE_ON_LOOP_BYTES:
                chat = _chat_request(body, settings)
            else:
                chat = await asyncio.to_thread(_chat_request, body, settings)
        model = chat.label if chat is not None else "other"
        raw_path = request.scope.get("raw_path") or path.encode()
        query = request.scope.get("query_string", b"")
        target = quote_from_bytes(raw_path, _QUERY_SAFE)
        if query:
            target += "?" + quote_from_bytes(query, _QUERY_SAFE)
        headers = [
            (k, v)
            for k, v in request.headers.raw
            if k.lower() not in _HOP and not k.lower().startswith(_GUARDRAIL_HEADERS)
        ]
        if teed or not any(k.lower() == b"accept-encoding" for k, _ in headers):
            # identity for the teed route: the tee reads the answer without inflating it
            headers = [(k, v) for k, v in headers if k.lower() != b"accept-encoding"]
            headers.append((b"accept-encoding", b"identity"))
        upstream = client().build_request(
            request.method, httpx.URL(target), content=body, headers=headers
        )
        del body  # the upstream request holds it until sent
        started = time.perf_counter()
        try:
            response = await client().send(upstream, stream=True)
        except httpx.TimeoutException as exc:
            answered(route, 504)
            return _error(504, "upstream_timeout", _timeout_message(exc, settings))
        except httpx.HTTPError as exc:
            answered(route, 502)
            return _error(
                502,
                "upstream_unavailable",
                f"the upstream model server could not be reached: {type(exc).__name__}: {exc}",
            )
        out_headers = [
            (k, v)
            for k, v in response.headers.raw
            if k.lower() not in _HOP and k.lower() not in _SERVER_OWN
        ]
        streamed = "text/event-stream" in response.headers.get("content-type", "")
        exchange = None
        if teed and chat is not None and response.status_code == 200:
            exchange = _Exchange(
                chat,
                settings.proxy_max_response_bytes,
                streamed=streamed,
                content_encoding=response.headers.get("content-encoding", ""),
                request_id=valid_request_id(request.headers.get("x-request-id")),
                traceparent=valid_traceparent(request.headers.get("traceparent")),
                force=request.headers.get(FORCE_HEADER, "").lower() in ("1", "always"),
            )
        first_byte: list[float] = []

        async def timed(raw: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            async for chunk in raw:
                if chunk and not first_byte:
                    first_byte.append(time.perf_counter())
                yield chunk

        def done() -> None:
            end = time.perf_counter()
            ttfb = (first_byte[0] if first_byte else end) - started
            metrics.proxy_time_to_first_byte.labels(route=route, model=model).observe(ttfb)
            metrics.proxy_duration.labels(route=route, model=model).observe(end - started)

        rest = timed(response.aiter_raw())  # as sent: still compressed if it was
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
                if isinstance(exc, httpx.TimeoutException):
                    answered(route, 504)
                    return _error(504, "upstream_timeout", _timeout_message(exc, settings))
                answered(route, 502)
                return _error(
                    502,
                    "upstream_unavailable",
                    f"the upstream model server broke off its answer: {type(exc).__name__}: {exc}",
                )
            if whole:
                await response.aclose()
                done()
                content = b"".join(first)
                if exchange is not None:
                    exchange.keep(content)
                answer = Response(
                    content=content,
                    status_code=response.status_code,
                    background=BackgroundTask(settle_later, exchange) if exchange else None,
                )
                if request.method == "HEAD":  # the length of the body a GET would get
                    answer.raw_headers = [
                        h for h in answer.raw_headers if h[0] != b"content-length"
                    ]
                    out_headers += [h for h in response.headers.raw if h[0] == b"content-length"]
                answer.raw_headers.extend(out_headers)
                answered(route, response.status_code)
                return answer
        # streamed, or too large to hold: relayed as it comes
        relayed = StreamingResponse(
            relay(response, first, rest, exchange, done), status_code=response.status_code
        )
        relayed.raw_headers.extend(out_headers)
        answered(route, response.status_code)
        return relayed

    @app.post(CHAT_PATH, response_model=None)
    async def chat_completions(request: Request) -> Response:
        """OpenAI-compatible chat completions, forwarded to the configured upstream and
        teed to the audit."""
        return await forward(request)

    # every other path under /v1 (models, completions, embeddings, responses...): forwarded
    app.add_api_route(
        "/v1/{path:path}", forward, methods=_METHODS, include_in_schema=False, response_model=None
    )
