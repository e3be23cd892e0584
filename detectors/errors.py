"""The exception tree of the `detectors` library.

    DetectorError
    ├── InvalidImageError        the image is not an (H, W, 3) uint8 array, or is empty
    ├── PartitionError           no valid region partition (fewer than 2 regions, bad label map)
    │   └── ImageGeometryError   the image is too small or too thin for the regions asked for
    ├── InvalidTargetError       a target that cannot be explained (bad position, duplicate)
    ├── ScorerContractError      a scorer returned something other than (B, T) probabilities
    ├── ImageTokenError          a prompt's image tokens do not match the image features
    ├── MissingDependencyError   an optional dependency is needed for this call
    └── RemoteScorerError        a remote model server could not score (detectors.scorers.remote)
        ├── RemoteTokenMismatchError      the server's prompt tokens are not the audited tokens
        ├── RemoteUnsupportedError   the server lacks prompt_logprobs or continue_final_message
        └── RemoteRequestError       the server refused a request (4xx other than 429)
    RemoteUnavailableError       (not a DetectorError: retrying later may work) the server did not
                                 answer in time, or kept answering 429/503/5xx past the retries


Every message says what was wrong and what was expected.  `ValueError` subclasses are used where
the caller passed a bad value, so code that catches `ValueError` keeps working.
"""

from __future__ import annotations

__all__ = [
    "DetectorError",
    "ImageGeometryError",
    "ImageTokenError",
    "InvalidImageError",
    "InvalidTargetError",
    "MissingDependencyError",
    "PartitionError",
    "RemoteRequestError",
    "RemoteScorerError",
    "RemoteTokenMismatchError",
    "RemoteUnavailableError",
    "RemoteUnsupportedError",
    "ScorerContractError",
]


class DetectorError(Exception):
    """Base class of every error raised by `detectors`."""


class InvalidImageError(DetectorError, ValueError):
    """The image is not an `(H, W, 3)` uint8 array, or it is empty."""


class PartitionError(DetectorError, ValueError):
    """A region partition cannot be built or is malformed."""


class ImageGeometryError(PartitionError):
    """The image is too small or too thin to be split into the regions asked for (checked
    before any native partitioning code runs: OpenCV's SLIC crashes on such images)."""


class InvalidTargetError(DetectorError, ValueError):
    """A target token cannot be explained as given."""


class ScorerContractError(DetectorError):
    """A scorer broke the `Scorer` contract (shape, range or finiteness of its output)."""


class ImageTokenError(DetectorError, ValueError):
    """A prompt's image placeholder tokens do not match the features its image gives."""


class MissingDependencyError(DetectorError, ImportError):
    """An optional dependency is needed for the requested call."""


class RemoteScorerError(DetectorError):
    """A remote model server could not score a masked image; retrying will not help."""


class RemoteTokenMismatchError(RemoteScorerError):
    """The tokens the server rendered at the end of its prompt are not the tokens the model
    produced (the chat template or the tokenizer differs from the audited model's)."""


class RemoteUnsupportedError(RemoteScorerError):
    """The server does not support what a remote scorer needs (vLLM's `prompt_logprobs`,
    `continue_final_message`, prompt token ids); the message names it."""


class RemoteRequestError(RemoteScorerError):
    """The server refused a request (a 4xx other than 429: bad key, unknown model, too long)."""


class RemoteUnavailableError(Exception):
    """The server did not answer, or kept answering 429/503/5xx beyond the bounded retries.

    Not a `DetectorError`: the same audit may succeed later, so a worker retries its job."""
