"""Ablation: does the budgeted search's `_blind` probe change any result?

The probe measures the whole pool on one side once the other side has reached its goal and the
surrogate sees no region that helps (redundant evidence on the deletion side, conjunctive on
the insertion side).  Mutation testing found that disabling it fails no test.  This runs the
budgeted search on analytic tokens whose evidence is a redundant or a conjunctive pair of
regions at several places of an 8 x 8 grid, with the probe and without it, and prints one row
per case: the compact set, the necessity, why the search stopped and the passes spent.

    python benchmarks/blind_probe.py [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

import numpy as np

import detectors.search.budgeted as budgeted
from detectors import EagleSearch, SearchBudget, Target, grid_partition
from detectors.scorers import AnalyticScorer
from detectors.scorers.analytic import TokenResponse

IMAGE = np.zeros((64, 64, 3), dtype=np.uint8)
PARTITION = grid_partition(IMAGE, 8, 8)
TARGET = Target(position=0, token_id=0, text="cat")
PLACES = [(3, 7), (60, 63), (20, 45), (0, 63)]
KINDS = {  # weights of the pair and their interaction, in logits (bias -4)
    "redundant": (6.0, -6.0),  # either region alone shows the object
    "conjunctive": (0.5, 8.0),  # only the two together do
}


def _run(kind: str, pair: tuple[int, int], fraction: float, seed: int, probe: bool) -> Any:
    weight, interaction = KINDS[kind]
    w = np.random.default_rng(seed).normal(0.0, 0.05, 64)
    w[list(pair)] = weight
    scorer = AnalyticScorer(
        {0: TokenResponse(bias=-4.0, weights=w, interactions=((*pair, interaction),))}
    )
    original = budgeted._Search._blind
    if not probe:
        budgeted._Search._blind = lambda *args, **kwargs: False  # type: ignore[method-assign]
    try:
        budget = SearchBudget.fraction_of_exact(64, fraction)
        a = EagleSearch(scorer, budget).attribute(IMAGE, PARTITION, [TARGET])
    finally:
        budgeted._Search._blind = original  # type: ignore[method-assign]
    k = len(a.compact_set)
    return {
        "compact_set": sorted(a.compact_set),
        "necessity": round(1.0 - float(a.deletion[k, 0]), 3),
        "stopped_by": a.stopped_by.value,
        "passes": a.forward_passes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for kind, pair, fraction, seed in itertools.product(KINDS, PLACES, (0.05, 0.1), (0, 1)):
        on, off = (_run(kind, pair, fraction, seed, probe) for probe in (True, False))
        same = {k: v for k, v in on.items() if k != "passes"} == {
            k: v for k, v in off.items() if k != "passes"
        }
        rows.append(
            {"kind": kind, "pair": pair, "fraction": fraction, "seed": seed, "probe": on}
            | {"no_probe": off, "same_result": same}
        )
    if args.json:
        print(json.dumps(rows))
        return
    print(
        f"{'kind':<12} {'pair':<9} {'budget':>6} {'seed':>4}  {'compact set (probe)':<20} "
        f"{'passes on/off':>13}  same"
    )
    for r in rows:
        print(
            f"{r['kind']:<12} {r['pair']!s:<9} {r['fraction']:>6} {r['seed']:>4}  "
            f"{r['probe']['compact_set']!s:<20} "
            f"{r['probe']['passes']:>6}/{r['no_probe']['passes']:<6}  {r['same_result']}"
        )
    print(f"{sum(r['same_result'] for r in rows)} of {len(rows)} cases: the same result")


if __name__ == "__main__":
    main()
