"""The exception tree of the `detectors` library.

    DetectorError
    ├── InvalidImageError        the image is not an (H, W, 3) uint8 array, or is empty
    ├── PartitionError           no valid region partition (fewer than 2 regions, bad label map)
    │   └── ImageGeometryError   the image is too small or too thin for the regions asked for
    ├── InvalidTargetError       a target that cannot be explained (bad position, duplicate)
    ├── ScorerContractError      a scorer returned something other than (B, T) probabilities
    ├── ImageTokenError          a prompt's image tokens do not match the image features
    └── MissingDependencyError   an optional dependency is needed for this call

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
