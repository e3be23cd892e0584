"""How close the budgeted EAGLE search gets to the exact one, and at what cost.

For N regions in {16, 32, 64} and many random analytic scorers (additive, and with pairwise
interactions), it runs the exact greedy search (N(N + 1) passes), the authors' efficient variant
(at its natural cost and capped at our budgets), and our budgeted search at 5%, 10% and 20% of
the exact search's passes, and at the efficient variant's own cost.

Attainment = (area under F along the ordering - a random ordering's) / (exact's - random's),
with F = insight + necessity at every prefix, scored in closed form (no budget spent on it).

    python benchmarks/search_budget.py            # table
    python benchmarks/search_budget.py --json     # the same figures as one JSON object
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from detectors import EagleSearch, SearchBudget, Target, exact_search_passes, grid_partition
from detectors.evaluation import objective_area as evaluation_area
from detectors.evaluation import order_curves
from detectors.scorers import AnalyticScorer

GRIDS = {16: (4, 4), 32: (4, 8), 64: (8, 8)}
FRACTIONS = (0.05, 0.10, 0.20)
TARGET = Target(position=0, token_id=0, text="object")


def run_case(n: int, kind: str, seed: int) -> list[dict[str, object]]:
    interactions = 0 if kind == "additive" else max(2, n // 4)
    scorer = AnalyticScorer.random(n, seed, interactions=interactions)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    partition = grid_partition(image, *GRIDS[n])

    def objective_area(scorer: AnalyticScorer, order: np.ndarray) -> float:
        """Area under F(first k regions of `order`), k = 0..N, over k / N (closed form)."""
        curves = order_curves(scorer, image, partition, order, [TARGET], batch_size=1024)
        return evaluation_area(*curves)

    rng = np.random.default_rng(10_000 + seed)
    random_area = float(np.mean([objective_area(scorer, rng.permutation(n)) for _ in range(8)]))
    rows: list[dict[str, object]] = []

    def record(method: str, search: EagleSearch) -> int:
        started = time.perf_counter()
        attribution = search.attribute(image, partition, [TARGET])
        rows.append(
            {
                "n": n,
                "kind": kind,
                "seed": seed,
                "method": method,
                "passes": attribution.forward_passes,
                "area": objective_area(scorer, attribution.order),
                "random_area": random_area,
                "seconds": time.perf_counter() - started,
                "stopped_by": attribution.stopped_by.value,
            }
        )
        return attribution.forward_passes

    big = 256
    record("exact", EagleSearch(scorer, SearchBudget.exhaustive(batch_size=big)))
    efficient_passes = record(
        "efficient",
        EagleSearch(scorer, SearchBudget.exhaustive(batch_size=big), strategy="efficient"),
    )
    for fraction in FRACTIONS:
        budget = SearchBudget.fraction_of_exact(n, fraction, batch_size=big)
        record(f"budgeted@{fraction:.0%}", EagleSearch(scorer, budget))
        record(
            f"budgeted-full@{fraction:.0%}",
            EagleSearch(scorer, budget, stop_when_converged=False),
        )
        record(f"efficient@{fraction:.0%}", EagleSearch(scorer, budget, strategy="efficient"))
    equal = SearchBudget(max_forward_passes=efficient_passes, batch_size=big)
    record("budgeted@efficient", EagleSearch(scorer, equal))
    exact_area = float(rows[0]["area"])  # type: ignore[arg-type]
    for row in rows:
        span = exact_area - random_area
        row["attainment"] = (float(row["area"]) - random_area) / span if span > 1e-9 else 1.0  # type: ignore[arg-type]
    return rows


def summarise(rows: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    groups: dict[tuple[int, str, str], list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        groups[(int(row["n"]), str(row["kind"]), str(row["method"]))].append(row)  # type: ignore[call-overload]
    out = []
    for (n, kind, method), group in groups.items():
        attain = np.array([float(r["attainment"]) for r in group])  # type: ignore[arg-type]
        passes = np.array([float(r["passes"]) for r in group])  # type: ignore[arg-type]
        out.append(
            {
                "n": n,
                "kind": kind,
                "method": method,
                "cases": len(group),
                "passes_mean": float(passes.mean()),
                "passes_max": int(passes.max()),
                "share_of_exact": float(passes.mean() / exact_search_passes(n)),
                "attainment_mean": float(attain.mean()),
                "attainment_p10": float(np.percentile(attain, 10)),
                "attainment_min": float(attain.min()),
                "seconds_mean": float(np.mean([float(r["seconds"]) for r in group])),  # type: ignore[arg-type]
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="random scorers per (N, kind)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64], choices=sorted(GRIDS))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    rows: list[dict[str, object]] = []
    for n in args.sizes:
        for kind in ("additive", "interactions"):
            for seed in range(args.seeds):
                rows.extend(run_case(n, kind, seed))
    summary = summarise(rows)
    if args.json:
        print(json.dumps({"machine": platform.platform(), "seeds": args.seeds, "summary": summary}))
        return 0
    print(
        f"EAGLE search: attainment vs passes ({args.seeds} random analytic scorers per row; "
        f"{platform.machine()}, Python {platform.python_version()})"
    )
    header = (
        f"{'N':>3} {'kind':>12} {'method':>20} {'passes':>8} {'max':>6} {'% exact':>8} "
        f"{'attain':>7} {'p10':>6} {'min':>6} {'ms':>7}"
    )
    print(header)
    print("-" * len(header))
    for s in summary:
        print(
            f"{s['n']:>3} {s['kind']:>12} {s['method']:>20} {s['passes_mean']:8.1f} "
            f"{s['passes_max']:6d} {100 * float(s['share_of_exact']):7.1f}% "  # type: ignore[arg-type]
            f"{s['attainment_mean']:7.3f} {s['attainment_p10']:6.3f} {s['attainment_min']:6.3f} "
            f"{1000 * float(s['seconds_mean']):7.1f}"  # type: ignore[arg-type]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
