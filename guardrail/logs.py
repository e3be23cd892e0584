"""The service's logs: plain text on a terminal, or one JSON object per line for collectors.

`configure_logging(fmt)` sets up the root logger of a `guardrail` process (the API, a worker, a
supervised child); `uvicorn_log_config()` hands uvicorn's access and error loggers to it, so
every line of a process has one format. A JSON line carries `timestamp` (UTC, ISO 8601),
`level`, `logger`, `message`, `process`, and, when known, `request_id` (the client's
`X-Request-Id`, or the `request_id` of a sample) and `sample_id` (the sample being ingested or
audited), read from context variables that `RequestContextMiddleware` and the audit worker
set; uvicorn's access lines add `http_method`, `http_path`, `http_status` and `client`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Literal

__all__ = [
    "TEXT_FORMAT",
    "JsonFormatter",
    "LogFormat",
    "RequestContextMiddleware",
    "configure_logging",
    "log_context",
    "quiet_progress_bars",
    "request_id_var",
    "sample_id_var",
    "uvicorn_log_config",
]

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s %(message)s"

request_id_var: ContextVar[str | None] = ContextVar("guardrail_request_id", default=None)
sample_id_var: ContextVar[str | None] = ContextVar("guardrail_sample_id", default=None)

# what a request id may be (the API's `request_id` rule): visible ASCII, at most 128 characters;
# anything else from a client is not logged
_REQUEST_ID = re.compile(r"[!-~]{1,128}")
_NOISY = ("httpx", "apscheduler")  # a line per proxied request or per scheduler tick


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.processName,
        }
        request_id, sample_id = request_id_var.get(), sample_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        if sample_id is not None:
            entry["sample_id"] = sample_id
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            # uvicorn's access record: (client, method, path, http version, status)
            client, method, path, _, status = args
            entry.update(http_method=method, http_path=path, http_status=status, client=client)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _formatter(fmt: LogFormat) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format must be 'text' or 'json', got: {fmt!r}")


def configure_logging(fmt: LogFormat = "text", level: int | str = logging.INFO) -> None:
    """Send every log record of this process to stderr in `fmt`, replacing earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)


def uvicorn_log_config(*, access_log: bool) -> dict[str, Any]:
    """A `log_config` for uvicorn that gives its loggers no handlers of their own: their records
    reach the root logger, in the format `configure_logging` set."""
    quiet = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {
            "uvicorn": {"level": "INFO", **quiet},
            "uvicorn.error": {"level": "INFO", **quiet},
            "uvicorn.access": {"level": "INFO" if access_log else "WARNING", **quiet},
        },
    }


def quiet_progress_bars() -> None:
    """No progress bars from transformers (loading weights) when stderr is not a
    terminal (a log file, a container's log): they would be thousands of partial lines.
    Imports transformers: call it where a model is about to be loaded."""
    if sys.stderr.isatty():
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def log_context(*, request_id: str | None = None, sample_id: str | None = None) -> Iterator[None]:
    """Within the block, log records carry these ids (None leaves one as it was)."""
    tokens = []
    if request_id is not None:
        tokens.append((request_id_var, request_id_var.set(request_id)))
    if sample_id is not None:
        tokens.append((sample_id_var, sample_id_var.set(sample_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class RequestContextMiddleware:
    """ASGI middleware: the log records of an HTTP request (uvicorn's access line included)
    carry the client's `X-Request-Id` when it is a valid id."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                text = value.decode("latin-1")
                request_id = text if _REQUEST_ID.fullmatch(text) else None
                break
        request_token = request_id_var.set(request_id)
        sample_token = sample_id_var.set(None)
        try:
            await self.app(scope, receive, send)
        finally:
            sample_id_var.reset(sample_token)
            request_id_var.reset(request_token)
