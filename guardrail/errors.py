"""The service's exception tree.  Whether a failure is worth retrying is decided by its type.

    GuardrailError                     anything the guardrail service raises on purpose
    ├── PermanentError (ValueError)    bad input: the same request fails the same way again
    │   ├── ConfigError                invalid settings (config.py); names every bad key
    │   ├── ImageRejectedError         an image that cannot be accepted (images.py)
    │   │   └── ... format, size, geometry, corrupt (DecodeBusyError is retryable)
    │   ├── ChatFormatError            chat messages that cannot be audited (chat.py)
    │   ├── UnreadableAnswerError      an upstream answer that cannot be read (answers.py)
    │   ├── IngestError                a sample refused at ingest, with its HTTP status
    │   ├── AuditInputError            a sample the model cannot audit as sent (auditor.py)
    │   ├── UnknownModelError          a model this process does not configure
    │   └── MissingImageError          a job that carries no image
    └── RetryableError                 the same request may succeed later
        ├── DecodeBusyError            no decode memory free in time (also an ImageRejectedError)
        └── IngestBusyError            ingest refused a sample for that reason (503)

A class under both branches (`DecodeBusyError`) is retryable: `is_permanent` checks
`RetryableError` first.  Outside this tree, `detectors.errors.DetectorError` (a bad image,
target or partition; a remote server refusing a request) is permanent, and
`detectors.errors.RemoteUnavailableError` (a server that did not answer) is retryable.
"""

from __future__ import annotations

__all__ = [
    "GuardrailError",
    "MissingImageError",
    "PermanentError",
    "RetryableError",
    "UnknownModelError",
    "is_permanent",
]


class GuardrailError(Exception):
    """The root of the service's errors: the CLI prints `Type: message` and exits 2."""


class PermanentError(GuardrailError, ValueError):
    """Bad input (an image, a request, a configuration): retrying will not help."""


class RetryableError(GuardrailError):
    """A transient condition (a saturated decoder, an unavailable server): retry later."""


class UnknownModelError(PermanentError, LookupError):
    """A model name that this process does not configure."""


class MissingImageError(PermanentError):
    """A job or sample that carries no image to audit."""


def is_permanent(exc: BaseException) -> bool:
    """Whether `exc` will recur on the same input: a `PermanentError` or a
    `detectors.errors.DetectorError`, unless it is also a `RetryableError`.  Anything else
    (database errors, bugs, timeouts) is retried within the job's attempts."""
    from detectors.errors import DetectorError

    if isinstance(exc, RetryableError):
        return False
    return isinstance(exc, PermanentError | DetectorError)
