"""The search's decisions, pinned: 84 searches over random analytic models (additive weights,
pairwise interactions of both signs, one or two targets, budgets from a tight 40 passes to the
exhaustive search, both stopping rules) must give exactly the order, compact set, pass count,
stop reason and objective curve recorded in `fixtures/search_golden.json`.

The other search tests assert properties (the evidence is found, the budget holds); this one
catches any change in *what the search does*: a heuristic tweak, an off-by-one in the pass
accounting, a surrogate that ranks differently.  A change that is meant must be checked against
the benchmarks (`benchmarks/explain_speed.py`, `benchmarks/detection.py`) and the fixture then
rewritten on purpose:

    python -m tests.detectors.test_search_golden --update
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detectors import EagleSearch, SearchBudget, grid_partition
from detectors.scorers.analytic import AnalyticScorer, TokenResponse
from detectors.types import Target

FIXTURE = Path(__file__).parent / "fixtures" / "search_golden.json"
IMAGE = np.full((48, 48, 3), 90, dtype=np.uint8)
BUDGETS = (40, 120, 300)


def _model(seed: int, n: int) -> tuple[AnalyticScorer, tuple[Target, ...]]:
    """A random token response: a few strong regions, weak noise, interactions of both signs
    (redundant and conjunctive evidence), a prior from absent to strong; two targets for odd
    seeds (the second sharing some of the first's regions)."""
    rng = np.random.default_rng(seed)
    responses = {}
    targets = []
    for k in range(1 + seed % 2):
        weights = rng.normal(0.0, 0.3, n)
        strong = rng.choice(n, size=int(rng.integers(1, 5)), replace=False)
        weights[strong] += rng.uniform(1.0, 4.0, strong.size)
        pairs = []
        for _ in range(int(rng.integers(0, 4))):
            i, j = (int(x) for x in rng.choice(n, size=2, replace=False))
            pairs.append((i, j, float(rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 4.0))))
        responses[k + 1] = TokenResponse(
            bias=float(rng.uniform(-6.0, 1.0)), weights=weights, interactions=tuple(pairs)
        )
        targets.append(Target(position=3 + k, token_id=k + 1, text=f"w{k}"))
    return AnalyticScorer(responses, name=f"golden-{seed}"), tuple(targets)


def _cases() -> list[tuple[int, int | None, bool]]:
    """Each seed under each budget with either stopping rule, and once exhaustively (None)."""
    budgeted = [(s, b, c) for s in range(12) for b in BUDGETS for c in (True, False)]
    return budgeted + [(s, None, True) for s in range(12)]


def _fingerprint(seed: int, budget: int | None, converged: bool) -> dict[str, Any]:
    n = 24
    scorer, targets = _model(seed, n)
    partition = grid_partition(IMAGE, 6, 4)
    limit = SearchBudget.exhaustive() if budget is None else SearchBudget(max_forward_passes=budget)
    search = EagleSearch(scorer, limit, stop_when_converged=converged)
    a = search.attribute(IMAGE, partition, targets)
    curve = np.round(np.nan_to_num(a.objective, nan=-1.0), 9)
    return {
        "order": [int(r) for r in a.order],
        "compact_set": [int(r) for r in a.compact_set],
        "forward_passes": int(a.forward_passes),
        "stopped_by": a.stopped_by.value,
        "search": a.search,
        "objective_sha256": hashlib.sha256(curve.tobytes()).hexdigest()[:16],
    }


def _key(seed: int, budget: int | None, converged: bool) -> str:
    return f"seed={seed} budget={budget or 'exhaustive'} stop_when_converged={converged}"


@pytest.mark.parametrize(("seed", "budget", "converged"), _cases())
def test_the_search_does_what_it_did(seed: int, budget: int | None, converged: bool) -> None:
    golden = json.loads(FIXTURE.read_text())
    assert _fingerprint(seed, budget, converged) == golden[_key(seed, budget, converged)]


def test_the_golden_cases_cover_the_search_paths() -> None:
    """The fixture is not trivial: budgets stop some searches, others converge, the exact and
    budgeted strategies both run, and orders differ between cases."""
    golden = json.loads(FIXTURE.read_text())
    assert len(golden) == len(_cases())
    stops = {g["stopped_by"] for g in golden.values()}
    assert {"forward_budget", "converged"} <= stops, stops
    assert {g["search"] for g in golden.values()} >= {"eagle-budgeted", "eagle-exact"}
    assert len({tuple(g["order"]) for g in golden.values()}) > len(golden) // 4


if __name__ == "__main__" and "--update" in sys.argv:
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    data = {_key(*case): _fingerprint(*case) for case in _cases()}
    FIXTURE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(data)} fingerprints to {FIXTURE}")
