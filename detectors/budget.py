"""How much a search may spend."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SearchBudget", "exact_search_passes"]


def exact_search_passes(n_regions: int) -> int:
    """Forward passes of the paper's exact greedy search over `n_regions` regions: N(N + 1)."""
    return n_regions * (n_regions + 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchBudget:
    """Limits of one search.  `None` means unlimited.

    Attributes:
        max_forward_passes: masked images the search may score (at least 2: the original and the
            blank image).
        max_seconds: wall time; checked before every batch, so it is honoured within one batch.
        batch_size: masked images per scorer call (capped by the scorer's `max_batch_size`).
            Never changes the result, only the speed.
        max_regions: size limit of the compact set; the search stops refining after that many.
    """

    max_forward_passes: int | None = None
    max_seconds: float | None = None
    batch_size: int = 16
    max_regions: int | None = None

    def __post_init__(self) -> None:
        if self.max_forward_passes is not None and self.max_forward_passes < 2:
            raise ValueError(
                "max_forward_passes must be at least 2 (the original and the blank image) or None, "
                f"got: {self.max_forward_passes}"
            )
        if self.max_seconds is not None and not (
            math.isfinite(self.max_seconds) and self.max_seconds > 0
        ):
            raise ValueError(
                f"max_seconds must be a positive number or None, got: {self.max_seconds}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got: {self.batch_size}")
        if self.max_regions is not None and self.max_regions < 1:
            raise ValueError(f"max_regions must be positive or None, got: {self.max_regions}")

    @classmethod
    def exhaustive(cls, *, batch_size: int = 16) -> SearchBudget:
        """No limits: the paper's exact greedy search, N(N + 1) forward passes."""
        return cls(batch_size=batch_size)

    @classmethod
    def fraction_of_exact(
        cls,
        n_regions: int,
        fraction: float,
        *,
        batch_size: int = 16,
        max_seconds: float | None = None,
    ) -> SearchBudget:
        """A budget of `fraction` of the exact search's N(N + 1) forward passes."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got: {fraction}")
        passes = max(2, int(fraction * exact_search_passes(n_regions)))
        return cls(max_forward_passes=passes, batch_size=batch_size, max_seconds=max_seconds)

    @property
    def is_exhaustive(self) -> bool:
        return (
            self.max_forward_passes is None
            and self.max_seconds is None
            and self.max_regions is None
        )
