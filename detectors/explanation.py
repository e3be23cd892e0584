"""The one-call API: partition, search and judge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from detectors.budget import SearchBudget
from detectors.eagle import EagleSearch
from detectors.language_prior import PriorThresholds, judge, judge_sample
from detectors.regions import RegionPartition, slic_partition
from detectors.scorers.protocol import Scorer
from detectors.search.budgeted import TAIL_STEPS
from detectors.types import (
    DEFAULT_BUDGET_FRACTION,
    DEFAULT_FILL,
    DEFAULT_N_REGIONS,
    Attribution,
    CrossEvidence,
    Fill,
    Target,
    Verdict,
)

__all__ = ["Explanation", "explain"]


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Explanation:
    """What `explain` found: the regions, one attribution per target (or one joint one), and a
    verdict per target."""

    partition: RegionPartition
    attributions: tuple[Attribution, ...]
    verdicts: tuple[Verdict, ...]
    cross: CrossEvidence | None = None

    @property
    def forward_passes(self) -> int:
        probes = 0 if self.cross is None else self.cross.forward_passes
        return probes + sum(a.forward_passes for a in self.attributions)


def explain(
    image: np.ndarray,
    scorer: Scorer,
    targets: Sequence[Target],
    *,
    budget: SearchBudget | None = None,
    partition: RegionPartition | None = None,
    n_regions: int = DEFAULT_N_REGIONS,
    fill: Fill | str = DEFAULT_FILL,
    thresholds: PriorThresholds | None = None,
    joint: bool = False,
    progress: bool = False,
    tail_steps: int = TAIL_STEPS,
) -> Explanation:
    """Explain `targets` of one output: split the image into SLICO regions (unless a
    `partition` is given), run the EAGLE search (exact for `SearchBudget.exhaustive()`,
    budgeted otherwise; default: 10% of the exact search's passes), and judge each target.

    With `joint=False` (the default) every target gets its own search (forward passes shared
    where the searches coincide), so borrowed evidence between object words can be detected;
    with `joint=True` one search explains all targets together.  `tail_steps`: see
    `EagleSearch` (0: the end of each ordering from the screening alone, no pass).
    """
    partition = partition or slic_partition(image, n_regions)
    thresholds = thresholds or PriorThresholds()
    if budget is None:
        budget = SearchBudget.fraction_of_exact(partition.n_regions, DEFAULT_BUDGET_FRACTION)
    search = EagleSearch(
        scorer,
        budget,
        fill=fill,
        coverage=thresholds.coverage,
        progress=progress,
        tail_steps=tail_steps,
    )
    if joint:
        attribution = search.attribute(image, partition, targets)
        return Explanation(
            partition=partition,
            attributions=(attribution,),
            verdicts=tuple(judge(attribution, thresholds)),
        )
    if len(targets) == 1:
        attributions, cross = search.attribute_each(image, partition, targets), None
    else:
        attributions, cross = search.attribute_sample(image, partition, targets)
    return Explanation(
        partition=partition,
        attributions=tuple(attributions),
        verdicts=tuple(judge_sample(attributions, thresholds, cross)),
        cross=cross,
    )
