"""Our budgeted search: screening, a logit-additive surrogate, and lazy greedy refinement.

Read top to bottom: `budgeted_greedy` (the phases), `_Search` (the front, both ends, the final
order, one step at either end, the lazy greedy choice), `_Step` (one step's measurements);
the surrogate and the screening are in `detectors.search.surrogate`.

1. Anchors: the original and the blank image (2 passes).
2. Screening: the insertion and deletion image of every single region (2N passes; under a
   smaller budget deletion only, since removing one region from the full image is what reveals
   a region the token cannot do without).
3. A surrogate of the model, additive in logit space: region v adds a_v to the logit of the
   insertion score and removes d_v from the logit of the deletion score.  Screening gives the
   first a_v, d_v; every later measurement of S + {v} replaces them with the increments seen at
   the current S.  The surrogate predicts F(S + {v}) for every v at the cost of arithmetic, and
   it respects saturation (a region that cannot move a saturated probability gains nothing).
4. Refinement: at each step, score S + {v} for the `candidates` regions the surrogate ranks
   highest; accept the best measured one if no unmeasured prediction beats it (lazy greedy, as
   in CELF), otherwise measure the next `candidates`.  When a measurement misses the surrogate's
   prediction by more than `refresh_tolerance` logits (interactions between regions), the whole
   pool is re-measured at this S if at most half of the remaining budget pays for it.  Once one
   side has reached its goal (say the deletion image already lost 90% of what it can lose), only
   the other side is measured (half the passes); the leader's other image is then scored, and
   if the measurement drops it behind, the next leader's (lazily), starting with the region that
   is best on the measured side alone, so that a misjudged other side cannot hide it.
   Step 1 is free: its masks were scored by the screening and come from the cache.  When one
   side has reached its goal, the other is short of it, and the surrogate predicts no region
   that brings it closer, the whole pool is measured once in the current context, budget
   permitting: on the deletion side the evidence is redundant (the token survives the loss of
   any one region), on the insertion side it is conjunctive (only a pair of regions carries it,
   each alone may even lower the token: `test_eagle`'s pair case needs this probe).
5. Stop when the compact set explains the token (insight >= coverage * p_full and necessity >=
   coverage * (1 - p_blank)), when `max_regions` are chosen, or when the budget runs out.
6. With `stop_when_converged` off, the rest of the budget refines both ends of the ordering.
   The front's next step re-measures the pool in the current context (the increments
   extrapolated from the screening are stale once the object is visible); then each step goes
   to the end whose curve moved more at its latest step.  The tail is built from the back by
   the same lazy greedy search with the insertion and deletion images swapped (the region
   placed last leaves the most with all others visible and the least on its own:
   counter-evidence, such as the object that argues against a prior-driven word).  The
   regions left in the middle are ordered for free by continuing both greedy searches on their
   surrogates, from the front and from the back in turn (without a tail: from the front).
7. Without a tail refined from both ends, the end of the ordering is measured where it
   matters: the regions that argue against the token (counter-evidence: removing one alone
   from the original raises the token, or its logit gain alone on the blank image plus its
   drop when removed from the original is negative: the knife that argues for "yes" when the
   answer explained is "no") are removed from the original one after another, from the back.
   The last region is the one whose removal alone raised the token the most (screened, free);
   each step before it measures the `tail_candidates` strongest remaining candidates with the
   regions already placed behind them removed and takes the one that leaves the token
   highest, for at most `tail_steps` regions and within the budget left.  Removing regions in
   context sees what no single region shows: an object cut into two regions, each of which
   alone the other stands in for.  Those are the regions a correction removes first (EAGLE.md
   section 8); the surrogate, saturated once the compact set explains the token, cannot rank
   them.  With `tail_steps` 0 (the sidecar's audits: verdicts never read the end of the
   ordering), or when the budget has no pass left, the counter-evidence the screening saw
   (gain alone plus drop when removed, in logits, negative) goes last, strongest last (free).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detectors.budget import SearchBudget
from detectors.search.evaluator import MaskEvaluator, objective
from detectors.search.surrogate import LogitSurrogate, Objective, logit, screen
from detectors.search.trace import SearchTrace
from detectors.types import StopReason

__all__ = ["TAIL_STEPS", "LogitSurrogate", "budgeted_greedy"]

# regions at the end of the ordering measured in context (step 7)
TAIL_STEPS = 4


@dataclass(frozen=True, kw_only=True, slots=True)
class _Tuning:
    """How the greedy steps spend passes: `candidates` measured per round, the surprise (in
    logits) that triggers a re-measurement of the whole pool, and the share of the anchors'
    contrast that counts as explained."""

    candidates: int
    refresh_tolerance: float
    coverage: float
    tail_candidates: int = 8
    tail_steps: int = TAIL_STEPS


def budgeted_greedy(
    evaluator: MaskEvaluator,
    columns: np.ndarray,
    weights: tuple[float, float],
    budget: SearchBudget,
    *,
    candidates: int = 2,
    coverage: float = 0.9,
    refresh_tolerance: float = 1.0,
    stop_when_converged: bool = True,
    tail_candidates: int = 8,
    tail_steps: int = TAIL_STEPS,
) -> tuple[SearchTrace, list[int]]:
    """Run the budgeted search; see the module docstring.  Never spends more than the budget.

    `refresh_tolerance` is the prediction error, in logits, beyond which the surrogate counts
    as surprised and the whole pool is re-measured (when the budget allows)."""
    n = evaluator.n_regions
    trace = SearchTrace(n_regions=n, columns=columns)
    anchors = evaluator.evaluate(np.stack([np.ones(n, np.bool_), np.zeros(n, np.bool_)]))
    if anchors.shape[0] < 2:
        # Only a time budget can stop the search before its first two passes.
        raise TimeoutError(
            "the time budget ran out before the original and blank image were scored"
        )
    full, blank = anchors
    trace.record_anchors(full, blank)
    search = _Search(
        evaluator=evaluator,
        trace=trace,
        surrogate=screen(evaluator, full[columns], blank[columns], columns),
        weights=weights,
        tuning=_Tuning(
            candidates=candidates,
            refresh_tolerance=refresh_tolerance,
            coverage=coverage,
            tail_candidates=tail_candidates,
            tail_steps=tail_steps,
        ),
    )
    converged = search.front(budget.max_regions, stop_when_converged)
    if converged and not stop_when_converged:
        search.both_ends()
    elif converged:
        search.measured_tail()
    return trace, search.order()


class _Search:
    """The state of one budgeted search: the chosen front, the tail built from the back (only
    with `stop_when_converged` off), the pool in between and both surrogates."""

    def __init__(
        self,
        *,
        evaluator: MaskEvaluator,
        trace: SearchTrace,
        surrogate: LogitSurrogate,
        weights: tuple[float, float],
        tuning: _Tuning,
    ) -> None:
        n = evaluator.n_regions
        self.evaluator, self.trace, self.columns = evaluator, trace, trace.columns
        self.weights, self.tuning = weights, tuning
        full, blank = trace.insertion[n], trace.insertion[0]  # the anchors
        self.ins_goal = tuning.coverage * float(full[self.columns].mean())
        self.nec_goal = tuning.coverage * float(1.0 - blank[self.columns].mean())
        self.pool = list(range(n))
        self.surrogate, self.tail_surrogate = surrogate, surrogate.copy()
        # the screening's measurements, before later steps replace them: how much each region
        # argues for the token, alone on the blank image and removed from the original (mean
        # logit over the targets; under a deletion-only screening both are its removal)
        self.screened = surrogate.screened.copy()
        self.support = (surrogate.screened_gain + surrogate.screened_drop).mean(axis=1)
        self.chosen = np.zeros(n, dtype=np.bool_)
        self.behind = np.zeros(n, dtype=np.bool_)
        self.tail: list[int] = []
        self.removed_tail: list[int] = []  # step 7, placed last first
        self.current_ins, self.current_del = blank, full
        self.probed: set[str] = set()
        self.refresh_front = False
        # |change of F| at the latest step of each end: where the curve still moves
        self.front_move, self.tail_move = np.inf, np.inf
        self.tail_f = self._f(full[None], blank[None])

    # -- the objective, seen from the front and from the back --------------------------------

    def _f(self, ins: np.ndarray, dele: np.ndarray) -> float:
        return float(objective(ins[:, self.columns], dele[:, self.columns], self.weights)[0])

    def f_of(self, ins: np.ndarray, dele: np.ndarray) -> np.ndarray:
        return objective(ins, dele, self.weights)

    def f_tail(self, ins: np.ndarray, dele: np.ndarray) -> np.ndarray:
        # the tail's "insertion" image holds only the tail, its "deletion" image all the rest
        return objective(dele, ins, self.weights)

    def converged(self) -> bool:
        cols = self.columns
        return (
            float(self.current_ins[cols].mean()) >= self.ins_goal
            and float(1.0 - self.current_del[cols].mean()) >= self.nec_goal
        )

    # -- the phases -------------------------------------------------------------------------

    def front(self, max_regions: int | None, stop_when_converged: bool) -> bool:
        """Greedy steps at the front until the compact set explains the token (returns True),
        `max_regions` are chosen, the pool is empty or the budget runs out."""
        trace = self.trace
        while self.pool:
            if self.evaluator.stop_reason is not None:
                trace.stopped_by = self.evaluator.stop_reason
                return False
            if max_regions is not None and len(trace.selected) >= max_regions:
                trace.stopped_by = StopReason.MAX_REGIONS
                return False
            if not self.front_step():
                trace.stopped_by = self.evaluator.stop_reason or StopReason.FORWARD_BUDGET
                return False
            if self.converged():
                if stop_when_converged:
                    trace.stopped_by = StopReason.CONVERGED
                return True
        trace.stopped_by = StopReason.CONVERGED
        return True

    def both_ends(self) -> None:
        """The compact set explains the token: spend the rest of the budget where the curve
        still moves, at the front (finer ordering after the compact set) or at the back (the
        region placed last leaves the most with all others visible and the least on its own:
        the same greedy search with the two images' roles swapped and its own surrogate, whose
        first step the screening already measured)."""
        # The surrogate's front increments were extrapolated from single regions on the blank
        # image; once the object is visible they are stale: the next front step re-measures
        # the pool in this context, budget permitting, which also shows how much the front
        # can still gain.  The tail's first step is free (screening).
        self.refresh_front = True
        if not self.front_step():
            self.trace.stopped_by = self.evaluator.stop_reason or StopReason.CONVERGED
            return
        self.tail_move = np.inf
        while self.pool:
            step = self.tail_step if self.tail_move > self.front_move else self.front_step
            if not step():
                break
        self.trace.stopped_by = self.evaluator.stop_reason or StopReason.CONVERGED

    def measured_tail(self) -> None:
        """Step 7: the end of the ordering measured by removing counter-evidence from the
        original, from the back (see the module docstring)."""
        cols, n = self.columns, self.evaluator.n_regions
        drop = self.surrogate.screened_drop.mean(axis=1)
        strength = np.minimum(drop, self.support)
        found = [r for r in self.pool if self.screened[r] and strength[r] < 0.0]
        if not found or self.tuning.tail_steps < 1:
            return
        ranked = sorted(found, key=lambda r: (strength[r], r))  # the strongest first
        tail = [min(found, key=lambda r: (drop[r], r))]
        removed = np.zeros(n, dtype=np.bool_)
        removed[tail[0]] = True
        alone = self.evaluator.evaluate(~removed[None])  # screened: from the cache, no pass
        if alone.shape[0]:
            self.trace.record(n - 1, alone[0], np.full_like(alone[0], np.nan))
        while len(tail) < self.tuning.tail_steps:
            group = [r for r in ranked if not removed[r]][: self.tuning.tail_candidates]
            remaining = self.evaluator.remaining_passes
            if not group or (remaining is not None and remaining < len(group)):
                break
            keep = np.repeat(~removed[None], len(group), axis=0)
            keep[np.arange(len(group)), group] = False
            scores = self.evaluator.evaluate(keep)
            if scores.shape[0] < len(group):  # a time budget ran out
                break
            best = int(np.argmax(scores[:, cols].mean(axis=1)))
            tail.append(group[best])
            removed[group[best]] = True
            # the first n - len(tail) regions of the final order visible: an insertion point
            self.trace.record(n - len(tail), scores[best], np.full_like(scores[best], np.nan))
        self.removed_tail = tail

    def order(self) -> list[int]:
        """Front, the middle ordered on the surrogates (free), tail."""
        rest = list(self.pool)
        if not self.tail:
            middle = [self.surrogate.take_best(rest, self.f_of) for _ in self.pool]
            if self.removed_tail:
                behind = set(self.removed_tail)
                return [
                    *self.trace.selected,
                    *(r for r in middle if r not in behind),
                    *reversed(self.removed_tail),
                ]
            counter = self._counter_evidence(middle)
            behind = set(counter)
            return [*self.trace.selected, *(r for r in middle if r not in behind), *counter]
        # both ends were refined: fill the middle from both sides, each on its own surrogate
        front: list[int] = []
        back: list[int] = []
        while rest:
            front.append(self.surrogate.take_best(rest, self.f_of))
            if rest:
                back.append(self.tail_surrogate.take_best(rest, self.f_tail))
        return [*self.trace.selected, *front, *reversed(back), *reversed(self.tail)]

    def _counter_evidence(self, regions: list[int]) -> list[int]:
        """The regions among `regions` that the screening measured arguing against the token
        (its logit gain alone on the blank image plus its logit drop when removed from the
        original is negative), by increasing strength: the strongest comes last."""
        support = self.support
        found = [r for r in regions if self.screened[r] and support[r] < 0.0]
        return sorted(found, key=lambda r: (-support[r], r))

    # -- one step at either end -------------------------------------------------------------

    def front_step(self) -> bool:
        cols = self.columns
        # A side that has reached its goal barely moves F any more: measure only the other one
        # (half the passes) and take the saturated side from the surrogate.
        # Once both have (a finer ordering after the compact set), measure the one with more
        # room left.
        ins, dele = float(self.current_ins[cols].mean()), float(self.current_del[cols].mean())
        side = "both"
        if self.converged():
            side = "insertion" if 1.0 - ins >= dele else "deletion"
        elif 1.0 - dele >= self.nec_goal:
            side = "insertion"
        elif ins >= self.ins_goal:
            side = "deletion"
        whole_pool = False
        if (
            side != "both"
            and side not in self.probed
            and self.trace.selected
            and not self.converged()
        ):
            whole_pool = self._blind(side)
            if whole_pool:
                self.probed.add(side)
        if self.refresh_front:
            self.refresh_front = False
            whole_pool = whole_pool or self._affords_the_pool(side)
        before = self._f(self.current_ins[None], self.current_del[None])
        selection = self._choose(
            surrogate=self.surrogate,
            chosen=self.chosen,
            f_of=self.f_of,
            side=side,
            whole_pool=whole_pool,
        )
        if selection is None:
            return False
        region, self.current_ins, self.current_del = selection
        self.trace.select(region, self.current_ins, self.current_del)
        self.surrogate.advance(self.current_ins[cols], self.current_del[cols])
        self.chosen[region] = True
        self.pool.remove(region)
        self.front_move = abs(self._f(self.current_ins[None], self.current_del[None]) - before)
        return True

    def tail_step(self) -> bool:
        selection = self._choose(
            surrogate=self.tail_surrogate,
            chosen=self.behind,
            f_of=self.f_tail,
            side="both",
            whole_pool=False,
        )
        if selection is None:
            return False
        region, only_tail, without_tail = selection
        self.tail.append(region)
        n = self.behind.size
        self.trace.record(n - len(self.tail), without_tail, only_tail)
        self.tail_surrogate.advance(only_tail[self.columns], without_tail[self.columns])
        self.behind[region] = True
        self.pool.remove(region)
        f = self._f(without_tail[None], only_tail[None])
        self.tail_move, self.tail_f = abs(f - self.tail_f), f
        return True

    def _affords_the_pool(self, side: str, left: int | None = None) -> bool:
        """Whether measuring `left` regions (default: the whole pool) on `side` costs at most
        half of what is left of the budget."""
        remaining = self.evaluator.remaining_passes
        cost = (len(self.pool) if left is None else left) * (2 if side == "both" else 1)
        return remaining is None or 2 * cost <= remaining

    def _blind(self, side: str) -> bool:
        """Whether to measure the whole pool on `side` once: one side has reached its goal, the
        other is short of it, and the surrogate sees no region that brings it closer.

        On the deletion side the evidence is redundant (the token survives the loss of any one
        region); on the insertion side it is conjunctive (no single region adds much on top of
        the chosen ones, but a pair does).  Either way an additive surrogate cannot see it.
        Only when at most half of the remaining budget pays for it."""
        cols = self.columns
        predicted_ins, predicted_del = self.surrogate.predict(np.asarray(self.pool))
        if side == "deletion":
            need = self.nec_goal - float(1.0 - self.current_del[cols].mean())
            best = float((self.current_del[cols].mean() - predicted_del.mean(axis=1)).max())
        else:
            need = self.ins_goal - float(self.current_ins[cols].mean())
            best = float((predicted_ins.mean(axis=1) - self.current_ins[cols].mean()).max())
        remaining = self.evaluator.remaining_passes
        affordable = remaining is None or 2 * len(self.pool) <= remaining
        return need > 0 and best < 0.1 * need and affordable

    def _choose(
        self,
        *,
        surrogate: LogitSurrogate,
        chosen: np.ndarray,
        f_of: Objective,
        side: str,
        whole_pool: bool,
    ) -> tuple[int, np.ndarray, np.ndarray] | None:
        """One lazy greedy step: the region of the pool that maximises `f_of` added to
        `chosen`, with the score rows of its two images; None if the budget allowed no
        measurement.  Measures `candidates` at a time (all at once with `whole_pool`) in the
        surrogate's order until no unmeasured prediction beats the best measured gain (as in
        CELF); a surprised surrogate has the rest of the pool measured, budget permitting."""
        step = _Step(
            evaluator=self.evaluator,
            surrogate=surrogate,
            chosen=chosen,
            columns=self.columns,
            f_of=f_of,
            side=side,
        )
        pool = self.pool
        pool_arr = np.asarray(pool)
        predicted = f_of(*surrogate.predict(pool_arr))
        ranked = [pool[i] for i in np.lexsort((pool_arr, -predicted))]
        predicted_of = dict(zip(pool, predicted, strict=True))
        start, width = 0, len(ranked) if whole_pool else self.tuning.candidates
        while start < len(ranked):
            group = ranked[start : start + width]
            start += len(group)
            surprise, complete = step.measure(group)
            if not complete or start >= len(ranked):
                break
            # The surrogate misjudged this context (interactions): re-measure the whole pool
            # when at most half of what is left of the budget pays for it.
            left = len(ranked) - start
            if surprise > self.tuning.refresh_tolerance and self._affords_the_pool(side, left):
                width = left
                continue
            if step.best_gain() >= predicted_of[ranked[start]]:
                break
        return step.select()


class _Step:
    """The measurements of one greedy step: S + {v} for the candidates it tries.

    `side` says which images are scored: `both`, or only `insertion` / `deletion` (the other
    side is predicted by the surrogate; the chosen region's is scored once at `select`)."""

    def __init__(
        self,
        *,
        evaluator: MaskEvaluator,
        surrogate: LogitSurrogate,
        chosen: np.ndarray,
        columns: np.ndarray,
        f_of: Objective,
        side: str,
    ) -> None:
        self.evaluator, self.surrogate, self.chosen = evaluator, surrogate, chosen
        self.columns, self.f_of, self.side = columns, f_of, side
        self.gain: dict[int, float] = {}
        self.rows: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {}

    def measure(self, group: list[int]) -> tuple[float, bool]:
        """Score the group; returns (largest prediction error in logits, all scored)."""
        n = self.chosen.size
        inserted = np.repeat(self.chosen[None], len(group), axis=0)
        inserted[np.arange(len(group)), group] = True
        cols = self.columns
        if self.side != "both":
            # keep one pass back so the chosen region's other side can still be scored
            afford = self.evaluator.affordable(len(group) + 1) - 1
            group, inserted = group[: max(0, afford)], inserted[: max(0, afford)]
            if not group:
                return 0.0, False
        predicted_ins, predicted_del = self.surrogate.predict(np.asarray(group))
        if self.side == "both":
            pairs = np.empty((2 * len(group), n), dtype=np.bool_)
            pairs[0::2], pairs[1::2] = inserted, ~inserted
            scores = self.evaluator.evaluate(pairs)
            got = scores.shape[0] // 2
            ins_rows, del_rows = scores[0 : 2 * got : 2], scores[1 : 2 * got : 2]
        elif self.side == "insertion":
            ins_rows = self.evaluator.evaluate(inserted)
            got = ins_rows.shape[0]
            del_rows = None
        else:
            del_rows = self.evaluator.evaluate(~inserted)
            got = del_rows.shape[0]
            ins_rows = None
        surprise = 0.0
        for i in range(got):
            v = group[i]
            ins_row = None if ins_rows is None else ins_rows[i]
            del_row = None if del_rows is None else del_rows[i]
            ins = predicted_ins[i] if ins_row is None else ins_row[cols]
            dele = predicted_del[i] if del_row is None else del_row[cols]
            if ins_row is not None:
                surprise = max(surprise, float(np.abs(logit(ins) - logit(predicted_ins[i])).max()))
            if del_row is not None:
                surprise = max(surprise, float(np.abs(logit(dele) - logit(predicted_del[i])).max()))
            self.surrogate.observe(v, ins, dele)
            self.gain[v] = float(self.f_of(ins[None], dele[None])[0])
            self.rows[v] = (ins_row, del_row)
        return surprise, got == len(group) and got > 0

    def best_gain(self) -> float:
        return max(self.gain.values())

    def _measured_term(self, region: int) -> float:
        ins_row, del_row = self.rows[region]
        cols = self.columns
        if ins_row is not None and del_row is not None:
            return self.gain[region]
        if ins_row is not None:
            return float(ins_row[cols].mean())
        assert del_row is not None
        return float(1.0 - del_row[cols].mean())

    def select(self, max_checks: int = 4) -> tuple[int, np.ndarray, np.ndarray] | None:
        """The best region with both of its score rows measured, or None if none was measured
        (or its other side could not be scored within the budget).

        With one side measured, a candidate's gain leans on the surrogate for the other; the
        leader's other side is scored, and if it falls behind, the next leader's (lazily, at
        most `max_checks` times; then the best fully measured one wins)."""
        if not self.gain:
            return None
        # The candidate that is best on the measured side alone is checked first: a surrogate
        # that misjudges its other side would otherwise hide it.
        measured = {v: self._measured_term(v) for v in self.gain}
        first: int | None = min(measured, key=lambda v: (-measured[v], v))
        for _ in range(max_checks):
            region = (
                first if first is not None else min(self.gain, key=lambda v: (-self.gain[v], v))
            )
            first = None
            ins_row, del_row = self.rows[region]
            if ins_row is not None and del_row is not None:
                if region == min(self.gain, key=lambda v: (-self.gain[v], v)):
                    return region, ins_row, del_row
                continue
            keep = self.chosen.copy()
            keep[region] = True
            other = self.evaluator.evaluate((keep if ins_row is None else ~keep)[None])
            if other.shape[0] == 0:
                break
            ins_row = other[0] if ins_row is None else ins_row
            del_row = other[0] if del_row is None else del_row
            ins, dele = ins_row[self.columns], del_row[self.columns]
            self.surrogate.observe(region, ins, dele)
            self.gain[region] = float(self.f_of(ins[None], dele[None])[0])
            self.rows[region] = (ins_row, del_row)
        complete = [v for v, (i, d) in self.rows.items() if i is not None and d is not None]
        # (the leader may still lean on the surrogate: the best fully measured one wins)
        if not complete:
            return None
        region = min(complete, key=lambda v: (-self.gain[v], v))
        ins_row, del_row = self.rows[region]
        assert ins_row is not None and del_row is not None
        return region, ins_row, del_row
