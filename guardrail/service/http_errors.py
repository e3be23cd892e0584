"""One error contract for the HTTP surface: every error answer has the same JSON body.

    {"error": {"type": "not_found", "message": "no sample '0123...'", "details": [...]}}

`type` is a snake_case kind (`invalid_request`, `unauthorized`, `forbidden`, `not_found`,
`payload_too_large`, `database_unavailable`, `internal_error`, ...), `message` a sentence that
says what was wrong, `details` (validation errors only) one entry per bad field.  A 503 carries
`Retry-After`.  Messages never echo raw client input that may not be valid JSON text (lone
surrogates, bytes); they are made JSON-safe and short before they leave.

`install_error_contract(app, ...)` puts the contract on a FastAPI app:
- handlers for `HTTPException` and `RequestValidationError`;
- `ErrorContractMiddleware` (outermost): any exception that escapes the app becomes a JSON
  answer (a database outage a 503, invalid data the database refused a 422, anything else a
  logged 500) and the keep-alive connection stays usable;
- `UrlGuardMiddleware`: a path or query string with control characters or undecodable
  percent-encoding gets a 400 before routing;
- `BodyLimitMiddleware`: a declared `Content-Length` over the limit gets a 413 at once, and a
  body without one is counted while it streams and stopped at the limit with a 413.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "RETRY_AFTER_SECONDS",
    "ApiError",
    "BodyLimitMiddleware",
    "ErrorBody",
    "ErrorContractMiddleware",
    "ErrorDetail",
    "ErrorInfo",
    "UrlGuardMiddleware",
    "error_response",
    "error_responses",
    "exception_response",
    "install_error_contract",
    "is_database_outage",
    "is_unmigrated_database",
    "json_safe",
]

log = logging.getLogger("guardrail.http")

RETRY_AFTER_SECONDS = 5
MAX_MESSAGE_CHARS = 1000
MAX_DETAILS = 20

_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


class ErrorDetail(BaseModel):
    """One invalid field of a request."""

    loc: list[str | int] = Field(description="where: 'body', 'query', 'path', then the field")
    msg: str = Field(description="what is wrong with it")
    type: str = Field(description="the kind of problem (pydantic's error type)")


class ErrorInfo(BaseModel):
    type: str = Field(description="snake_case kind, e.g. invalid_request, not_found")
    message: str = Field(description="a sentence that says what was wrong")
    details: list[ErrorDetail] | None = Field(
        default=None, description="validation errors only: one entry per bad field"
    )


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorInfo


class ApiError(HTTPException):
    """An HTTP error with an explicit `type` (default: the one for its status)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code, message, headers=headers)
        self.error_type = error_type or _TYPES.get(status_code) or _fallback_type(status_code)


def _fallback_type(status: int) -> str:
    return "internal_error" if status >= 500 else "invalid_request"


_ESCAPE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def json_safe(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` with control characters and lone surrogates escaped, cut to `limit` characters."""
    text = _ESCAPE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_response(
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    details: Sequence[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The contract's JSON answer; a 503 gets `Retry-After` unless `headers` set one."""
    error: dict[str, Any] = {
        "type": error_type or _TYPES.get(status) or _fallback_type(status),
        "message": json_safe(message),
    }
    if details is not None:
        error["details"] = list(details)
    out = dict(headers or {})
    if status == 503 and not any(k.lower() == "retry-after" for k in out):
        out["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return JSONResponse({"error": error}, status_code=status, headers=out)


_DEFAULT_MESSAGES = {
    404: "there is no endpoint at this path (see /docs for the API)",
    405: "this endpoint does not accept that method",
}


def _http_exception_response(exc: HTTPException) -> JSONResponse:
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    phrase = _phrase(status)
    message = _DEFAULT_MESSAGES.get(status, phrase) if detail == phrase else detail
    if detail == _FASTAPI_PARSE_ERROR and exc.__cause__ is not None:
        message = f"the request body could not be parsed: {_parse_failure(exc.__cause__)}"
    if status == 405 and exc.headers and exc.headers.get("Allow"):
        message = f"{message}; allowed: {exc.headers['Allow']}"
    return error_response(
        status,
        message,
        error_type=getattr(exc, "error_type", None),
        headers=dict(exc.headers or {}),
    )


_FASTAPI_PARSE_ERROR = "There was an error parsing the body"


def _parse_failure(cause: BaseException) -> str:
    if isinstance(cause, RecursionError):
        return "it is nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return "it is not UTF-8 text"
    first = str(cause).strip().splitlines()
    return first[0] if first else type(cause).__name__


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    details = [_detail(err) for err in exc.errors()[:MAX_DETAILS]]
    shown = "; ".join(f"{_where(d['loc'])}: {d['msg']}" for d in details[:5])
    more = len(exc.errors()) - 5
    if more > 0:
        shown += f"; and {more} more"
    return error_response(422, f"invalid request: {shown}", details=details)


def _detail(err: Any) -> dict[str, Any]:
    """A pydantic error without its input or context (which may hold unencodable text)."""
    loc = [x if isinstance(x, int) else json_safe(str(x), 80) for x in err.get("loc", ())]
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return {"loc": loc, "msg": json_safe(msg, 300), "type": json_safe(str(err.get("type")), 60)}


def _where(loc: Iterable[str | int]) -> str:
    parts = [str(x) for x in loc]
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]  # "prompt" reads better than "body.prompt"
    return ".".join(parts) or "request"


def is_database_outage(exc: BaseException) -> bool:
    """The database cannot be reached or is too busy (worth retrying), not a bad query."""
    if isinstance(exc, sa_exc.TimeoutError):  # the connection pool is exhausted
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        # SQLite reports its own syntax errors as OperationalError too: only its busy, locked,
        # I/O, full, read-only and cannot-open codes are an outage
        code = getattr(exc.orig, "sqlite_errorcode", None)
        return code is None or code & 0xFF in _SQLITE_OUTAGE_CODES
    return False


# SQLITE_READONLY, BUSY, LOCKED, NOMEM, IOERR, FULL, CANTOPEN, PROTOCOL
_SQLITE_OUTAGE_CODES = {5, 6, 7, 8, 10, 13, 14, 15}


# PostgreSQL's undefined_table / undefined_column; SQLite says it in words
_MISSING_SCHEMA_STATES = {"42P01", "42703"}
_MISSING_SCHEMA_WORDS = ("no such table", "no such column")


def is_unmigrated_database(exc: BaseException) -> bool:
    """The schema is missing or older than the code (`guardrail db upgrade` was not run)."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if getattr(exc.orig, "sqlstate", None) in _MISSING_SCHEMA_STATES:
        return True
    return any(words in str(exc.orig).lower() for words in _MISSING_SCHEMA_WORDS)


def exception_response(exc: BaseException) -> JSONResponse:
    """The contract's answer for an exception no route handled (logged unless expected)."""
    inner = getattr(exc, "exceptions", None)  # an exception group (a task group's) of one
    if isinstance(inner, tuple) and len(inner) == 1 and isinstance(inner[0], BaseException):
        return exception_response(inner[0])
    if isinstance(exc, HTTPException):
        return _http_exception_response(exc)
    if isinstance(exc, RequestValidationError):
        return _validation_response(exc)
    if is_unmigrated_database(exc):
        log.error("the database schema is not migrated: %s", str(exc).splitlines()[0])
        return error_response(
            503,
            "the database schema is not migrated to this version (an operator must run "
            f"`guardrail db upgrade`); retry after {RETRY_AFTER_SECONDS} seconds",
            error_type="database_unavailable",
        )
    if is_database_outage(exc):
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        log.warning("database unavailable: %s", first[0] if first else type(exc).__name__)
        return error_response(
            503,
            f"the database is unavailable; retry after {RETRY_AFTER_SECONDS} seconds",
            error_type="database_unavailable",
        )
    if isinstance(exc, sa_exc.DataError):
        log.warning("the database refused a value: %s", str(exc).splitlines()[0])
        return error_response(
            422,
            "the database refused a value in this request as invalid data (check the text "
            "fields for control characters and the numbers for their range)",
        )
    log.error("unhandled error while serving a request", exc_info=exc)
    return error_response(
        500,
        f"internal error ({type(exc).__name__}); the service's log has the details",
    )


class ErrorContractMiddleware:
    """Outermost: whatever escapes the app becomes a contract answer, without re-raising (a
    re-raised error makes the server drop the keep-alive connection).  An error after the
    response started is re-raised (the connection must close: the answer is cut), and one
    after it finished is only logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = False

        async def tracked(message: Message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if finished:
                log.error("error after a response was sent", exc_info=exc)
                return
            if started:
                raise
            await exception_response(exc)(scope, receive, send)


_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _url_part_problem(raw: bytes, what: str) -> str | None:
    from urllib.parse import unquote_to_bytes

    if _BAD_ESCAPE.search(raw):
        return f"the {what} has a '%' that is not followed by two hexadecimal digits"
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return f"the {what} does not decode to UTF-8 text (percent-encode UTF-8 bytes only)"
    found = _CONTROL.search(text)
    if found is not None:
        name = unicodedata.name(found.group(), f"U+{ord(found.group()):04X}")
        return f"the {what} contains a control character ({name}); they are not allowed"
    return None


class UrlGuardMiddleware:
    """400 `invalid_request` for a path or query string with a control character or
    undecodable percent-encoding, before routing (nothing downstream sees it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogatepass")
            problem = _url_part_problem(raw_path, "path") or _url_part_problem(
                scope.get("query_string", b""), "query string"
            )
            if problem is not None:
                await error_response(400, problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class PayloadTooLargeError(ApiError):
    def __init__(self, limit: int, declared: int | None = None) -> None:
        size = f"of {declared} bytes " if declared is not None else ""
        super().__init__(
            413,
            f"the request body {size}is over the limit of {limit} bytes",
            error_type="payload_too_large",
            headers={"Connection": "close"},  # the rest of the body is never read
        )


class BodyLimitMiddleware:
    """At most `limit` body bytes per request (paths in `exempt`, a set or a predicate, bound
    their own bodies).

    A declared Content-Length over the limit is answered 413 before the app runs; otherwise
    `receive` counts the bytes as they stream and raises a 413 `ApiError` at the limit."""

    def __init__(
        self, app: ASGIApp, *, limit: int, exempt: Iterable[str] | Callable[[str], bool] = ()
    ) -> None:
        if limit < 0:
            raise ValueError(f"the body limit must be non-negative, got: {limit}")
        self.app = app
        self.limit = limit
        if callable(exempt):
            self.exempt: Callable[[str], bool] = exempt
        else:
            self.exempt = frozenset(exempt).__contains__

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            error = PayloadTooLargeError(self.limit, declared)
            await _http_exception_response(error)(scope, receive, send)
            return
        received = 0

        values = 0
        counted = _is_json(scope)

        async def limited() -> Message:
            nonlocal received, values
            message = await receive()
            if counted and message["type"] == "http.request":
                # an upper bound on the JSON values, counted before the body is parsed: 30 MB of
                # "0," parses into 15 M objects (GBs) within the byte limit
                body = message.get("body", b"")
                values += body.count(b",") + body.count(b"[") + body.count(b"{")
                if values > MAX_JSON_VALUES:
                    raise ApiError(
                        413,
                        f"the JSON body holds more than {MAX_JSON_VALUES} values; send fewer "
                        "(metadata is limited to a few hundred keys)",
                    )
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise PayloadTooLargeError(self.limit)
            return message

        await self.app(scope, limited, send)


MAX_JSON_VALUES = 1_000_000


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return b"json" in value.lower()
    return False


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed Content-Length itself
    return None


def error_responses(*statuses: int, html_route: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route's error statuses, all with the `ErrorBody` model.

    A route whose answers are HTML (`html_route`) gets a JSON reference instead of the model
    (FastAPI would file the model under text/html); a JSON route of the app registers it."""
    if html_route:
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        return {
            status: {"description": _DESCRIPTIONS.get(status, _phrase(status)), "content": content}
            for status in statuses
        }
    return {
        status: {"model": ErrorBody, "description": _DESCRIPTIONS.get(status, _phrase(status))}
        for status in statuses
    }


_DESCRIPTIONS = {
    400: "invalid_request: a control character or undecodable percent-encoding in the URL, "
    "or a body that could not be parsed",
    401: "unauthorized: no bearer token (when tokens are configured)",
    403: "forbidden: a bearer token that is not allowed",
    404: "not_found: no such sample, report, model or endpoint",
    413: "payload_too_large: the request body is over max_request_bytes, or the image over "
    "max_image_bytes or max_image_pixels",
    415: "unsupported_media_type: the image is not PNG, JPEG or WebP",
    422: "invalid_request: invalid fields (details lists them); invalid_image: an image that "
    "is corrupt or cannot be audited (too small, too thin)",
    500: "internal_error: a bug; the service's log has the details",
    503: "database_unavailable: the database cannot be reached or is not migrated; "
    "ingest_busy: no decode memory free (both with Retry-After)",
}


def install_error_contract(
    app: FastAPI,
    *,
    max_request_bytes: int,
    body_limit_exempt: Iterable[str] | Callable[[str], bool] = (),
) -> None:
    """Put the error contract, the URL guard and the body limit on `app` (call once, before
    the app serves)."""

    async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
        return exception_response(exc)

    app.add_exception_handler(HTTPException, on_http_exception)
    app.add_exception_handler(RequestValidationError, on_http_exception)
    # the last added middleware is the outermost
    app.add_middleware(BodyLimitMiddleware, limit=max_request_bytes, exempt=body_limit_exempt)
    app.add_middleware(UrlGuardMiddleware)
    app.add_middleware(ErrorContractMiddleware)
