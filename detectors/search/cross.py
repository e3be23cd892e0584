"""Cross-evidence between the object words of one output: whose regions does each rely on?

Measured on the reference model (validation, 20 scenes per kind, mean fill, 48 regions, a
tenth of the exact budget): the donor-object probes found an object for 214 of 236 words of
multi-word captions and it was longer than the compact set for only 3 (removing a knife's
one-region compact set already collapses "knife"), so they change no verdict there and cost
~0.5 passes per word; they matter where a budget stop leaves a merely sufficient compact set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from detectors.budget import SearchBudget
from detectors.search.evaluator import MaskEvaluator
from detectors.types import Attribution, CrossEvidence

__all__ = ["DONOR_COLLAPSE", "DONOR_PASSES", "cross_evidence"]

# A donor's object is the shortest prefix of its ordering whose removal brings its probability
# to at most DONOR_COLLAPSE * p_full, searched with at most DONOR_PASSES masks per donor.
DONOR_COLLAPSE = 0.25
DONOR_PASSES = 4


def cross_evidence(
    evaluator: MaskEvaluator,
    attributions: Sequence[Attribution],
    batch_size: int,
    *,
    collapse: float = DONOR_COLLAPSE,
    max_donor_passes: int = DONOR_PASSES,
) -> CrossEvidence:
    """For every pair of targets (i, j), score target i with j's compact set removed, and with
    i's own compact set minus j's removed; then the same with j's *object* removed instead of
    its compact set (`donor_objects`).

    The compact set is minimal for j's insight, so its removal need not collapse j: the rest of
    the object may still show it (and still lend to i).  j's object is found on j's own
    ordering: the shortest prefix whose removal brings P(j) to at most `collapse` * p_full(j),
    bracketed between the compact set and the shortest collapsing prefix already measured (the
    blank image at worst), then narrowed by geometric bisection with at most
    `max_donor_passes` new masks per donor; no object where the bracket does not close.  A mask
    scores every word at once, so each probe also measures every i without that prefix.  One
    more pass per pair scores i with its own compact set minus j's object removed.  Masks
    scored before (j's deletion images, the blank) come from the cache for free; every other
    pass is counted in `forward_passes`."""
    if not 0.0 <= collapse <= 1.0:
        raise ValueError(f"collapse must be in [0, 1], got: {collapse!r}")
    if max_donor_passes < 0:
        raise ValueError(f"max_donor_passes must be >= 0, got: {max_donor_passes!r}")
    t = len(attributions)
    sets = [np.asarray(a.compact_set, dtype=np.int64) for a in attributions]
    n = evaluator.n_regions
    without = np.full((t, t), np.nan)
    own_only = np.full((t, t), np.nan)
    evaluator.begin(SearchBudget(batch_size=batch_size))
    keeps: list[np.ndarray] = []
    slots: list[tuple[str, int, int]] = []
    for j in range(t):
        keeps.append(_removing(n, sets[j]))
        slots.append(("without", -1, j))
    for i in range(t):
        for j in range(t):
            if i == j:
                continue
            keeps.append(_removing(n, np.setdiff1d(sets[i], sets[j])))
            slots.append(("own", i, j))
    scores = evaluator.evaluate(np.stack(keeps))
    for (kind, i, j), row in zip(slots, scores, strict=True):
        if kind == "without":
            without[:, j] = row
        else:
            own_only[i, j] = row[i]
    own_removed = np.diag(without).copy()  # P(j) with its own compact set removed
    for j in range(t):
        without[j, j] = np.nan
    objects, without_object = _donor_objects(
        evaluator, attributions, own_removed, collapse, max_donor_passes
    )
    own_object = np.full((t, t), np.nan)
    pairs = [(i, j) for i in range(t) for j in range(t) if i != j and objects[j].size]
    if pairs:
        rows = evaluator.evaluate(
            np.stack([_removing(n, np.setdiff1d(sets[i], objects[j])) for i, j in pairs])
        )
        for (i, j), row in zip(pairs, rows, strict=True):
            own_object[i, j] = row[i]
    return CrossEvidence(
        without_other=without,
        own_only_removed=own_only,
        forward_passes=evaluator.passes,
        donor_objects=tuple(tuple(int(r) for r in regions) for regions in objects),
        without_donor_object=without_object,
        own_only_removed_object=own_object,
    )


def _removing(n: int, regions: np.ndarray) -> np.ndarray:
    keep = np.ones(n, dtype=np.bool_)
    keep[regions] = False
    return keep


def _donor_objects(
    evaluator: MaskEvaluator,
    attributions: Sequence[Attribution],
    own_removed: np.ndarray,
    collapse: float,
    max_passes: int,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per donor j: the regions of its object (empty when no prefix within reach collapses it)
    and `(T, T)` [i, j] = P(i) with them removed (NaN where none was found; [j, j] is P(j)
    itself with its object removed).

    Each j keeps a bracket of prefix lengths of its order: removing `lo` regions leaves P(j)
    above the collapse level, removing `hi` regions (the shortest such prefix known) brings it
    to or below.  Without a known `hi` the prefix doubles; with one, the bracket is split at
    its geometric mean (objects are a few regions of many).  All donors are probed together,
    one mask each per round, for at most `max_passes` rounds.  j gets an object only when its
    bracket closed (hi = lo + 1, or the compact set itself collapses j) short of the whole
    image: a longer prefix would take other objects' regions with it."""
    t = len(attributions)
    n = evaluator.n_regions
    level = [collapse * float(a.p_full[0]) for a in attributions]
    lo = [len(a.compact_set) for a in attributions]
    hi: list[int | None] = [None] * t
    for j, a in enumerate(attributions):
        if own_removed[j] <= level[j]:
            hi[j] = lo[j]  # the compact set is the whole object
            continue
        # the search's deletion images (and the blank image) are measured and in the cache
        deletion = a.deletion[:, 0]
        measured = [r for r in np.flatnonzero(~np.isnan(deletion)) if r > lo[j]]
        collapsing = [int(r) for r in measured if deletion[r] <= level[j]]
        if collapsing:
            hi[j] = min(collapsing)
            lo[j] = max([lo[j], *(int(r) for r in measured if r < min(collapsing))])
    for _ in range(max_passes):
        probes: list[tuple[int, int]] = []
        for j in range(t):
            top = hi[j]
            if top is None:
                r = min(n, 2 * lo[j])
            elif top - lo[j] > 1:
                r = min(top - 1, max(lo[j] + 1, round(math.sqrt(lo[j] * top))))
            else:
                continue
            if r > lo[j]:
                probes.append((j, r))
        if not probes:
            break
        keep = np.stack([_removing(n, attributions[j].order[:r]) for j, r in probes])
        for (j, r), row in zip(probes, evaluator.evaluate(keep), strict=True):
            if row[j] <= level[j]:
                hi[j] = r
            else:
                lo[j] = r
    # an object is the shortest collapsing prefix found (the bracket closed), never the image
    objects = [
        np.asarray(a.order[:top], np.int64)
        if top is not None and top - low <= 1 and top < n
        else np.empty(0, dtype=np.int64)
        for a, low, top in zip(attributions, lo, hi, strict=True)
    ]
    out = np.full((t, t), np.nan)
    found = [j for j in range(t) if objects[j].size]
    if found:
        # every one of these masks was scored above or by the search: cache hits
        rows = evaluator.evaluate(np.stack([_removing(n, objects[j]) for j in found]))
        for j, row in zip(found, rows, strict=True):
            out[:, j] = row
    return objects, out
