"""The benchmark scripts keep working (their figures are not asserted here: they are measured)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_search_budget_benchmark_prints_json() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "search_budget.py"),
            "--seeds",
            "1",
            "--sizes",
            "16",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(proc.stdout)
    methods = {row["method"] for row in report["summary"]}
    assert {"exact", "efficient", "budgeted@10%", "efficient@10%", "budgeted@efficient"} <= methods
    exact = next(r for r in report["summary"] if r["method"] == "exact")
    assert exact["passes_mean"] == 16 * 17 and exact["attainment_mean"] == 1.0
