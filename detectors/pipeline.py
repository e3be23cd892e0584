"""Auditing one sampled output: flag its object words, explain each, judge each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from detectors.budget import SearchBudget
from detectors.explanation import Explanation, explain
from detectors.language_prior import PriorThresholds
from detectors.layout import ImageLayout, layout_partition
from detectors.objects import DEFAULT_VOCABULARY, ObjectMention, ObjectVocabulary, flag_objects
from detectors.regions import RegionPartition, slic_partition
from detectors.scorers.protocol import Scorer
from detectors.types import DEFAULT_BUDGET_FRACTION, DEFAULT_FILL, DEFAULT_N_REGIONS, Fill

__all__ = ["AuditSettings", "SampleAudit", "audit_sample"]


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditSettings:
    """How a sample is audited.

    Attributes:
        n_regions: SLICO division number.
        budget_fraction: forward-pass budget per object token, as a share of the exact search's
            N(N + 1) (ignored when `max_forward_passes` is set).
        max_forward_passes: a fixed budget per object token instead.
        max_seconds: wall-time budget per object token.
        fill: what removed regions become.
        batch_size: masked images per scorer call.
        tail_steps: regions at the end of each ordering measured in context (`EagleSearch`);
            0 by default: a verdict never reads the end of the ordering, so an audit does not
            pay for it (explanations for people, `detectors.explain` and `guardrail explain`,
            measure 4).
    """

    n_regions: int = DEFAULT_N_REGIONS
    budget_fraction: float = DEFAULT_BUDGET_FRACTION
    max_forward_passes: int | None = None
    max_seconds: float | None = None
    fill: Fill = DEFAULT_FILL
    batch_size: int = 16
    tail_steps: int = 0

    def budget(self, n_regions: int) -> SearchBudget:
        if self.max_forward_passes is not None:
            return SearchBudget(
                max_forward_passes=self.max_forward_passes,
                max_seconds=self.max_seconds,
                batch_size=self.batch_size,
            )
        return SearchBudget.fraction_of_exact(
            n_regions,
            self.budget_fraction,
            batch_size=self.batch_size,
            max_seconds=self.max_seconds,
        )


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class SampleAudit:
    """The object words of one output and what the guardrail concluded about each."""

    mentions: tuple[ObjectMention, ...]
    explanation: Explanation | None  # None when the output names no object

    @property
    def forward_passes(self) -> int:
        return 0 if self.explanation is None else self.explanation.forward_passes


def audit_sample(
    image: np.ndarray,
    scorer: Scorer,
    token_ids: Sequence[int],
    decode: Callable[[Sequence[int]], str],
    *,
    settings: AuditSettings | None = None,
    thresholds: PriorThresholds | None = None,
    vocabulary: ObjectVocabulary = DEFAULT_VOCABULARY,
    partition: RegionPartition | None = None,
    layout: ImageLayout | None = None,
    progress: bool = False,
) -> SampleAudit:
    """Flag the object words of `token_ids`, run one budgeted EAGLE search per word (sharing
    forward passes), and judge each word (borrowed evidence across words included).

    `scorer` must score this sample (its image, prompt and generated tokens).  With `layout`
    `image` is a canvas of several images: each is partitioned on its own and the one search
    ranks the regions of all of them (`detectors.layout`)."""
    settings = settings or AuditSettings()
    mentions = tuple(flag_objects(token_ids, decode, vocabulary))
    if not mentions:
        return SampleAudit(mentions=(), explanation=None)
    if partition is None:
        partition = (
            slic_partition(image, settings.n_regions)
            if layout is None
            else layout_partition(image, layout, settings.n_regions)
        )
    explanation = explain(
        image,
        scorer,
        [m.target() for m in mentions],
        budget=settings.budget(partition.n_regions),
        partition=partition,
        fill=settings.fill,
        thresholds=thresholds,
        progress=progress,
        tail_steps=settings.tail_steps,
    )
    return SampleAudit(mentions=mentions, explanation=explanation)
