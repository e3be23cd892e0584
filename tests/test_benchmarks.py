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


def _run_json(script: str, *args: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    report: dict[str, object] = json.loads(proc.stdout)
    return report


def test_scorer_speed_benchmark_prints_json() -> None:
    report = _run_json(
        "scorer_speed.py", "--variants", "4", "--repeats", "1", "--chunks", "4", "--chunk", "4"
    )
    for key in ("speedup_reference_model", "max_abs_prob_diff", "overhead_share"):
        assert isinstance(report[key], float), key
    assert float(report["max_abs_prob_diff"]) <= 1e-5  # type: ignore[arg-type]
    results = report["results"]
    assert isinstance(results, list)
    assert [r["image_tokens"] for r in results] == [36, 256, 64, 256]
    assert [r["model"] for r in results][-2:] == ["tiny-qwen2.5-vl", "tiny-internvl"]
    for row in results[-2:]:
        assert "vision=onnx:CPUExecutionProvider" in row["scorer"]
        assert row["max_abs_prob_diff"] <= 1e-5 and row["speedup_a_over_c"] > 0
    assert results[-1]["scorer"].startswith("internvl-fast(")
    tower = results[-2]["vision_tower_ms_per_chunk"]
    assert set(tower) == {"transformers_torch", "batched_torch", "batched_onnx"}


def test_explain_speed_benchmark_prints_json() -> None:
    report = _run_json("explain_speed.py", "--scenes", "1", "--regions", "8", "--fraction", "0.5")
    for key in ("speedup", "attainment", "reference_passes", "ours_passes"):
        assert isinstance(report[key], float), key
    assert float(report["reference_passes"]) > float(report["ours_passes"])  # type: ignore[arg-type]


def test_proxy_overhead_benchmark_prints_json() -> None:
    report = _run_json("proxy_overhead.py", "--requests", "2")
    assert report["samples_teed"] >= 4  # warm-up requests are teed too; the last may lag
    for mode in ("plain", "stream"):
        assert isinstance(report[mode], dict) and "overhead_p50_ms" in report[mode]


def test_sidecar_load_benchmark_prints_json() -> None:
    report = _run_json(
        "sidecar_load.py",
        "--requests",
        "5",
        "--rate",
        "50",
        "--samples",
        "40",
        "--concurrency",
        "4",
        "--outage-requests",
        "3",
        "--flood",
        "4",
    )
    for key in (
        "proxy_overhead_p50_ms",
        "proxy_overhead_p99_ms",
        "ingest_samples_per_s",
        "peak_rss_mb_serve",
        "peak_rss_mb_worker",
    ):
        assert isinstance(report[key], float), key
    assert report["failed_requests_during_db_outage"] == 0
    assert report["ingest_5xx_during_db_outage"] == 0


def test_remote_scorer_benchmark_prints_json() -> None:
    report = _run_json(
        "remote_scorer.py", "--variants", "4", "--concurrency", "1", "2", "--repeats", "1"
    )
    rows = report["remote"]
    assert isinstance(rows, list) and [r["concurrency"] for r in rows] == [1, 2]
    assert all(r["failures"] == 0 and r["passes_per_second"] > 0 for r in rows)
    assert float(report["max_abs_prob_diff"]) <= 1e-5  # type: ignore[arg-type]
    for key in ("local_fast_passes_per_second", "request_overhead_ms_per_pass"):
        assert isinstance(report[key], float), key
