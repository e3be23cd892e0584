"""Domain values that cross module boundaries: targets, attributions, verdicts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from detectors.errors import InvalidTargetError

if TYPE_CHECKING:
    from detectors.regions import RegionPartition

__all__ = [
    "DEFAULT_FILL",
    "Attribution",
    "AuditedWord",
    "CrossEvidence",
    "Fill",
    "StopReason",
    "Target",
    "Verdict",
    "VerdictLabel",
]


class Fill(str, enum.Enum):
    """What replaces the pixels of a removed region.

    `BLACK` is the paper's choice.  A model that reads black as an object barely reacts to
    black-filled removals; `MEAN` (the image's mean colour) or `BLUR` then remove an object better.
    `DEFAULT_FILL` (mean) is the default everywhere: `EagleSearch`, `explain`, `AuditSettings`,
    `guardrail explain` and the sidecar; verdict thresholds are calibrated per fill
    (`detectors.calibration`).
    """

    BLACK = "black"
    GREY = "grey"
    MEAN = "mean"
    BLUR = "blur"


# The audit defaults, defined once: how removed pixels are filled, how many SLICO regions an
# image is split into (the division number) and the budget per word as a share of the exact
# search's N(N+1) passes.  The library, the CLI and the sidecar all start from these.
DEFAULT_FILL = Fill.MEAN
DEFAULT_N_REGIONS = 48
DEFAULT_BUDGET_FRACTION = 0.10


class StopReason(str, enum.Enum):
    """Why a search stopped.  Running out of a budget is a result, not an error."""

    COMPLETE = "complete"  # the exact search ordered every region greedily
    CONVERGED = "converged"  # the compact set explains the token, or nothing is left to refine
    FORWARD_BUDGET = "forward_budget"
    TIME_BUDGET = "time_budget"
    MAX_REGIONS = "max_regions"


@dataclass(frozen=True, kw_only=True, slots=True)
class Target:
    """One generated token to explain.

    Attributes:
        position: index of the token among the generated tokens (0 = first generated token).
        token_id: the vocabulary id the model generated there.
        text: the token (or word) as text, for people.
    """

    position: int
    token_id: int
    text: str = ""

    def __post_init__(self) -> None:
        if self.position < 0:
            raise InvalidTargetError(
                f"target position must be >= 0 (an index among the generated tokens), "
                f"got: {self.position}"
            )
        if self.token_id < 0:
            raise InvalidTargetError(f"target token_id must be >= 0, got: {self.token_id}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Attribution:
    """The result of one EAGLE search over the regions of one image.

    Attributes:
        targets: the explained tokens, T of them (the objective is their mean).
        partition: the regions, N of them.
        order: `(N,)` int, every region id once; earlier = more important.
        insertion: `(N + 1, T)` float, row r = probability with only the first r regions of
            `order` visible (row 0 = blank image, row N = original).  NaN where not scored.
        deletion: `(N + 1, T)` float, row r = probability with the first r regions removed
            (row 0 = original, row N = blank).  NaN where not scored.
        p_full: `(T,)` probability on the original image.
        p_blank: `(T,)` probability on the blank (fully filled) image.
        compact_set: region ids of the shortest prefix of `order` whose insight reaches the
            coverage of `p_full` (at least one region).
        forward_passes: masked images actually scored (cache hits are free).
        seconds: wall time of the search.
        stopped_by: why the search stopped.
        search: which search produced it (`eagle-exact`, `eagle-budgeted`, `eagle-efficient`).
        scorer_name: the scorer's `name` (model, execution provider).
        fill: how removed pixels were filled.
        weights: (lambda1, lambda2) of the objective.
        version: version of the `detectors` library that produced it.
    """

    targets: tuple[Target, ...]
    partition: RegionPartition
    order: np.ndarray
    insertion: np.ndarray
    deletion: np.ndarray
    p_full: np.ndarray
    p_blank: np.ndarray
    compact_set: tuple[int, ...]
    forward_passes: int
    seconds: float
    stopped_by: StopReason
    search: str
    scorer_name: str
    fill: Fill
    weights: tuple[float, float] = (1.0, 1.0)
    version: str = ""

    @property
    def n_regions(self) -> int:
        return int(self.order.shape[0])

    @property
    def partition_method(self) -> str:
        return self.partition.method

    @property
    def objective(self) -> np.ndarray:
        """`(N + 1,)` F along the order: lambda1 * mean insight + lambda2 * mean necessity (NaN
        where a prefix was not scored)."""
        l1, l2 = self.weights
        return np.asarray(
            l1 * self.insertion.mean(axis=1) + l2 * (1.0 - self.deletion).mean(axis=1)
        )

    @property
    def scored_prefixes(self) -> np.ndarray:
        """`(K,)` int, prefix lengths r whose insertion and deletion scores are known."""
        known = ~np.isnan(self.insertion).any(axis=1) & ~np.isnan(self.deletion).any(axis=1)
        return np.flatnonzero(known)

    def saliency(self) -> np.ndarray:
        """`(H, W)` float map in [0, 1]: EAGLE.md section 6, earlier regions hotter."""
        from detectors.saliency import region_values

        return np.asarray(region_values(self)[self.partition.labels])


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class CrossEvidence:
    """How the object words of one output depend on each other's regions (T words).

    Attributes:
        without_other: `(T, T)`; [i, j] = probability of word i with word j's compact set
            removed (NaN on the diagonal).
        own_only_removed: `(T, T)`; [i, j] = probability of word i with its own compact set
            minus word j's removed (NaN on the diagonal).
        forward_passes: passes spent on these probes (cache hits are free), the donor-object
            search included.
        donor_objects: per word j, the regions of its *object*: the shortest prefix of j's
            ordering found whose removal brings P(j) to at most a fraction of its p_full
            (`detectors.search.cross.DONOR_COLLAPSE`); the compact set when its removal already
            does; empty when no prefix within the probe budget does.  Empty tuple: not probed.
        without_donor_object: `(T, T)`; [i, j] = probability of word i with word j's object
            removed; [j, j] = P(j) itself with it removed; NaN where j has no object (None:
            not probed).
        own_only_removed_object: `(T, T)`; [i, j] = probability of word i with its own
            compact set minus word j's object removed (NaN on the diagonal and where j has no
            object; None: not probed).
    """

    without_other: np.ndarray
    own_only_removed: np.ndarray
    forward_passes: int
    donor_objects: tuple[tuple[int, ...], ...] = ()
    without_donor_object: np.ndarray | None = None
    own_only_removed_object: np.ndarray | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditedWord:
    """One audited object word of an output, as stored beside its attribution and verdict.

    Attributes:
        position: index of its first token among the generated tokens.
        token_id: that token's id.
        word: the surface form as written ("knives").
        category: its canonical category ("knife").
    """

    position: int
    token_id: int
    word: str
    category: str


class VerdictLabel(str, enum.Enum):
    """What a verdict concludes about one word.  `hallucinated()` is the one definition of
    which labels count as hallucinations (reports, spike checks, the demo, dashboards)."""

    GROUNDED = "grounded"
    LANGUAGE_PRIOR = "language_prior"
    BORROWED_EVIDENCE = "borrowed_evidence"
    UNDETERMINED = "undetermined"

    @classmethod
    def hallucinated(cls) -> frozenset[VerdictLabel]:
        """The labels that count as hallucinations: language prior and borrowed evidence."""
        return _HALLUCINATED

    @property
    def is_hallucination(self) -> bool:
        return self in _HALLUCINATED


_HALLUCINATED = frozenset({VerdictLabel.LANGUAGE_PRIOR, VerdictLabel.BORROWED_EVIDENCE})


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    """What the guardrail concludes about one audited token, with the numbers behind it.

    Attributes:
        target: the token.
        label: grounded / language_prior / borrowed_evidence / undetermined.
        prior_score: in [0, 1], higher = more driven by the language prior.
        hallucination_score: in [0, 1], higher = more likely a hallucination of either kind
            (noisy-or of `prior_score`, the borrowed-evidence score and 1 - p_full).
        p_full: probability on the original image.
        p_blank: probability on the blank image (what the text alone predicts).
        insight: probability with only the compact set visible.
        necessity: 1 - probability with the compact set removed (EAGLE's indispensability).
        relative_drop: how much of p_full is lost when the compact set is removed, in [0, 1].
        perceptual_influence: area-normalised area between the insertion curve and its minimum.
        compact_set: region ids the decision was made from.
        reason: one sentence a person can read.
        detector: name of the rule set; version: its version.
        borrowed_from: for borrowed evidence, the position of the token whose evidence it uses.
    """

    target: Target
    label: VerdictLabel
    prior_score: float
    hallucination_score: float
    p_full: float
    p_blank: float
    insight: float
    necessity: float
    relative_drop: float
    perceptual_influence: float
    compact_set: tuple[int, ...]
    reason: str
    detector: str
    version: str
    borrowed_from: int | None = None
    extra: dict[str, float] = field(default_factory=dict)
