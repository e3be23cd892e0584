"""What the API's routes share: bearer-token authentication, id checks, error responses."""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Annotated, Any

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from guardrail.config import Settings
from guardrail.service.http_errors import ApiError, error_responses

__all__ = ["INGEST_ERRORS", "LIST_ERRORS", "READ_ERRORS", "bearer_auth", "checked_id"]

_ID = re.compile(r"[0-9a-f]{32}")

# auto_error=False: `authorize` answers 401/403 itself (and nothing when no tokens are set)
_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="BearerToken",
    description="one of the configured api_tokens (not checked when none are configured)",
)
INGEST_ERRORS = error_responses(400, 401, 403, 404, 413, 415, 422, 500, 503)
READ_ERRORS = error_responses(400, 401, 403, 404, 422, 500, 503)
LIST_ERRORS = error_responses(400, 401, 403, 422, 500, 503)


def bearer_auth(settings: Settings) -> list[Any]:
    """The dependencies that guard a route: a bearer token among `api_tokens` (401 without
    one, 403 for another; nothing is checked when no tokens are configured)."""
    digests = [hashlib.sha256(t.get_secret_value().encode()).digest() for t in settings.api_tokens]

    async def authorize(  # async: no blocking work, so no thread hop per request
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if not digests:
            return
        if credentials is None:
            raise ApiError(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        # equal-length digests, every token compared: the time taken says nothing about them
        given = hashlib.sha256(credentials.credentials.encode()).digest()
        allowed = False
        for digest in digests:
            allowed |= hmac.compare_digest(given, digest)
        if not allowed:
            raise ApiError(403, "this token is not allowed")

    return [Depends(authorize)]


def checked_id(kind: str, value: str) -> str:
    """A sample or report id, or a 404 that says what ids look like (no query with junk)."""
    if _ID.fullmatch(value) is None:
        raise ApiError(
            404, f"no {kind} {value[:64]!r}: {kind} ids are 32 lowercase hexadecimal characters"
        )
    return value
