"""EAGLE attribution: which regions of an image make a model produce a token."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Literal

import numpy as np

from detectors.budget import SearchBudget
from detectors.errors import InvalidTargetError
from detectors.regions import RegionPartition, validate_image
from detectors.scorers.protocol import Scorer
from detectors.search.budgeted import TAIL_STEPS, budgeted_greedy
from detectors.search.cross import cross_evidence
from detectors.search.efficient import efficient_greedy
from detectors.search.evaluator import MaskEvaluator
from detectors.search.exact import exact_greedy
from detectors.search.trace import SearchTrace, to_attribution
from detectors.types import DEFAULT_FILL, Attribution, CrossEvidence, Fill, Target
from detectors.version import __version__

__all__ = ["EagleSearch", "Strategy"]

Strategy = Literal["auto", "exact", "budgeted", "efficient"]


class EagleSearch:
    """Explains generated tokens by the regions of the image they rely on.

    Args:
        scorer: the model, behind the `Scorer` protocol.
        budget: `SearchBudget.exhaustive()` runs the paper's exact greedy search (N(N + 1)
            forward passes); a finite budget runs our budgeted search, which never exceeds it.
        weights: (lambda1, lambda2), the weights of insight and necessity in the objective.
        fill: what removed pixels become (recorded with the attribution).
        strategy: `auto` (exact for an exhaustive budget, budgeted otherwise), or force
            `exact`, `budgeted`, or `efficient` (the authors' faster variant, a baseline).
        coverage: share of p_full (and of 1 - p_blank) at which the compact set explains the
            token; the budgeted search stops there.
        candidates: regions re-scored per step of the budgeted search.
        stop_when_converged: the budgeted search stops once the compact set explains the
            token (cheapest verdict); off, it spends the rest of its budget ordering the other
            regions (finer saliency maps and curves).
        tail_steps: when the budgeted search stops at the compact set, the regions at the end
            of the ordering measured by removing counter-evidence from the original in context
            (`detectors.search.budgeted`, step 7; up to 8 passes per region after the first,
            from the budget left): what a correction removes first.  0 orders the end on the
            screening alone (no pass), as the sidecar's audits do: verdicts never read it.
        progress: show a progress bar (tqdm) over forward passes.
        efficient_options: `search_scope`, `update_step`, `pending_samples` of `efficient`.
        clock: the time source of the time budget (seconds).
    """

    def __init__(
        self,
        scorer: Scorer,
        budget: SearchBudget | None = None,
        weights: tuple[float, float] = (1.0, 1.0),
        *,
        fill: Fill | str = DEFAULT_FILL,
        strategy: Strategy = "auto",
        coverage: float = 0.9,
        candidates: int = 2,
        stop_when_converged: bool = True,
        tail_steps: int = TAIL_STEPS,
        progress: bool = False,
        efficient_options: dict[str, int] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if len(weights) != 2 or any(not np.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"weights must be two non-negative numbers, got: {weights}")
        if not 0 < coverage <= 1:
            raise ValueError(f"coverage must be in (0, 1], got: {coverage}")
        if candidates < 1:
            raise ValueError(f"candidates must be positive, got: {candidates}")
        if tail_steps < 0:
            raise ValueError(f"tail_steps must be 0 or more, got: {tail_steps}")
        if strategy not in ("auto", "exact", "budgeted", "efficient"):
            raise ValueError(
                f"strategy must be auto, exact, budgeted or efficient, got: {strategy!r}"
            )
        self.scorer = scorer
        self.budget = budget if budget is not None else SearchBudget.exhaustive()
        self.weights = (float(weights[0]), float(weights[1]))
        self.fill = Fill(fill)
        self.strategy = strategy
        self.coverage = coverage
        self.candidates = candidates
        self.stop_when_converged = stop_when_converged
        self.tail_steps = tail_steps
        self.progress = progress
        self.efficient_options = dict(efficient_options or {})
        self.clock = clock

    @property
    def resolved_strategy(self) -> str:
        if self.strategy == "auto":
            return "exact" if self.budget.is_exhaustive else "budgeted"
        return self.strategy

    def attribute(
        self, image: np.ndarray, partition: RegionPartition, targets: Sequence[Target]
    ) -> Attribution:
        """One search for all `targets` together (the objective is their mean)."""
        evaluator = self._evaluator(image, partition, targets)
        with self._progress_bar(evaluator) as bar:
            evaluator._progress = bar
            return self._search(evaluator, np.arange(len(evaluator.targets)))

    def attribute_each(
        self, image: np.ndarray, partition: RegionPartition, targets: Sequence[Target]
    ) -> list[Attribution]:
        """One search per target, each under the full budget, sharing forward passes: every
        masked image is scored for all targets at once and cached, so masks common to the
        searches (anchors, screening) are paid once.  Each attribution counts the passes its
        own search caused."""
        evaluator = self._evaluator(image, partition, targets)
        with self._progress_bar(evaluator) as bar:
            evaluator._progress = bar
            return [self._search(evaluator, np.array([i])) for i in range(len(evaluator.targets))]

    def attribute_sample(
        self, image: np.ndarray, partition: RegionPartition, targets: Sequence[Target]
    ) -> tuple[list[Attribution], CrossEvidence]:
        """`attribute_each`, then the cross-evidence between the targets (which one's regions
        each relies on): a few passes more, mostly served from the shared cache."""
        evaluator = self._evaluator(image, partition, targets)
        with self._progress_bar(evaluator) as bar:
            evaluator._progress = bar
            attributions = [
                self._search(evaluator, np.array([i])) for i in range(len(evaluator.targets))
            ]
            cross = cross_evidence(evaluator, attributions, self.budget.batch_size)
        return attributions, cross

    def _evaluator(
        self, image: np.ndarray, partition: RegionPartition, targets: Sequence[Target]
    ) -> MaskEvaluator:
        image = validate_image(image)
        if partition.shape != image.shape[:2]:
            raise ValueError(
                f"partition shape {partition.shape} does not match image shape {image.shape[:2]}"
            )
        targets = tuple(targets)
        if not targets:
            raise InvalidTargetError("at least one target token is needed")
        positions = [t.position for t in targets]
        if len(set(positions)) != len(positions):
            raise InvalidTargetError(f"targets must have distinct positions, got: {positions}")
        # The exact search is the yardstick: it pays every one of its N(N + 1) passes.
        cache = self.resolved_strategy != "exact"
        return MaskEvaluator(
            self.scorer, image, partition, targets, fill=self.fill, cache=cache, clock=self.clock
        )

    def _progress_bar(self, evaluator: MaskEvaluator) -> Any:
        if not self.progress:
            return nullcontext(None)
        from tqdm.auto import tqdm

        n = evaluator.n_regions
        total = (self.budget.max_forward_passes or n * (n + 1)) * len(evaluator.targets)
        return tqdm(total=total, unit="pass", desc=f"EAGLE {self.resolved_strategy}")

    def _search(self, evaluator: MaskEvaluator, columns: np.ndarray) -> Attribution:
        strategy = self.resolved_strategy
        budget = SearchBudget.exhaustive(batch_size=self.budget.batch_size)
        if strategy != "exact":
            budget = self.budget
        evaluator.begin(budget)
        started = self.clock()
        trace: SearchTrace
        if strategy == "exact":
            trace, order = exact_greedy(evaluator, columns, self.weights)
        elif strategy == "efficient":
            trace, order = efficient_greedy(
                evaluator, columns, self.weights, **self.efficient_options
            )
        else:
            trace, order = budgeted_greedy(
                evaluator,
                columns,
                self.weights,
                budget,
                candidates=self.candidates,
                coverage=self.coverage,
                stop_when_converged=self.stop_when_converged,
                tail_steps=self.tail_steps,
            )
        return to_attribution(
            trace,
            order,
            evaluator,
            search=f"eagle-{strategy}",
            weights=self.weights,
            coverage=self.coverage,
            seconds=self.clock() - started,
            version=__version__,
        )
