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


def test_scorer_speed_runs_only_the_named_rows() -> None:
    small = ["--variants", "2", "--repeats", "1", "--chunks", "2", "--chunk", "2"]
    report = _run_json("scorer_speed.py", *small, "--models", "tiny-internvl")
    results = report["results"]
    assert isinstance(results, list)
    assert [r["model"] for r in results] == ["tiny-internvl"]
    assert results[0]["max_abs_prob_diff"] <= 1e-5
    assert report["speedup_reference_model"] is None  # the reference model's row did not run
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scorer_speed.py"), "--models", "gpt-4"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--models takes some of reference," in proc.stderr


def test_blend_speed_benchmark_prints_json() -> None:
    report = _run_json("blend_speed.py", "--rows", "2", "--repeats", "1")
    results = report["results"]
    assert isinstance(results, list)
    assert [(r["case"], r["rows"]) for r in results] == [("identity", 2), ("resized", 2)]
    identity, resized = results
    assert identity["band_share"] == 0.0 and 0.0 < resized["band_share"] < 0.2
    for row in results:
        assert set(row["ms_per_chunk"]) == {"dense", "shares", "shares+out"}
        assert max(row["max_abs_diff_from_dense"].values()) <= 1e-6


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
        "peak_rss_mb_decoder",
    ):
        assert isinstance(report[key], float), key
    assert report["peak_rss_mb_decoder"] > 0  # the flood's images were decoded in children
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


def test_detection_benchmark_prints_json(tmp_path: Path) -> None:
    # one co-occurrence trap ("fork knife .", and a wrong "yes" to "Is there a fork?") and one
    # language-prior trap ("bird cup spoon ."): both hallucination kinds and the correction test
    words = tmp_path / "words.jsonl"
    report = _run_json(
        "detection.py",
        "--seed",
        "11500021",
        "--scenes-per-kind",
        "1",
        "--kinds",
        "cooccurrence_trap,prior_trap",
        "--bootstrap",
        "50",
        "--words-out",
        str(words),
    )
    rows = [json.loads(line) for line in words.read_text().splitlines()]
    assert len(rows) == report["n_words"]
    assert sorted(r["truth"] for r in rows).count("present") == report["n_present"]
    keys = {"word", "label", "p_full", "p_blank", "relative_drop", "borrowing_score"}
    assert keys <= set(rows[0])
    for key in (
        "auroc",
        "auroc_by_kind",
        "baseline_auroc",
        "passes_per_word",
        "amcr",
        "csr_at_10",
        "baseline_amcr",
        "n_words",
        "energy_pointing_game",
        "pointing_game",
        "auroc_interval",
        "auroc_minus_best_baseline_interval",
    ):
        assert key in report, key
    assert report["n_scenes"] == 2 and report["n_words"] == 5
    assert report["n_by_kind"] == {"language_prior": 1, "cooccurrence": 1, "other": 0}
    aurocs = [report["auroc"], *report["auroc_by_kind"].values()]  # type: ignore[attr-defined]
    aurocs += list(report["baseline_auroc"].values())  # type: ignore[attr-defined]
    assert all(0.0 <= float(a) <= 1.0 for a in aurocs)
    assert set(report["baseline_auroc"]) == {  # type: ignore[arg-type]
        "low_confidence",
        "image_free_contrast",
        "contrastive_decoding",
        "occlusion",
        "rise",
    }
    assert report["n_corrections"] == 1
    # the wrong "yes" about the fork is also audited as an answer whose donor is not named
    yes_no = report["yes_no"]
    assert isinstance(yes_no, dict)
    assert yes_no["n_by_kind"]["unnamed_donor"] == 1 and yes_no["n_by_kind"]["present"] >= 1
    assert set(yes_no["auroc"]["unnamed_donor"]) == {"ours", *report["baseline_auroc"]}  # type: ignore[arg-type]
    assert sum(yes_no["labels"]["unnamed_donor"].values()) == 1
    for value in (report["amcr"], report["csr_at_10"], *report["baseline_amcr"].values()):  # type: ignore[attr-defined]
        assert 0.0 <= float(value) <= 1.0
    assert 0.0 <= float(report["energy_pointing_game"]) <= 1.0  # type: ignore[arg-type]
    # what the heatmap shows (measured regions) concentrates on the object more than the
    # complete map, whose interpolated tail spreads mass over the background
    assert float(report["energy_pointing_game"]) >= float(  # type: ignore[arg-type]
        report["energy_pointing_game_all_regions"]  # type: ignore[arg-type]
    )
    assert 0.0 <= float(report["pointing_game"]) <= 1.0  # type: ignore[arg-type]
    # ours spends the search's passes per word; the two-pass contrast two per sample
    assert float(report["passes_per_word"]) > 10  # type: ignore[arg-type]
    assert report["baseline_passes_per_word"]["image_free_contrast"] == 4 / 5  # type: ignore[index]
    split = report["cascade"]
    assert isinstance(split, dict) and 0.0 <= float(split["auroc"]) <= 1.0
    stages = split["stages_by_truth"]
    assert sum(sum(c.values()) for c in stages.values()) == 5
    # the co-occurrence hallucination is confident and image-dependent: it must be searched
    assert stages["cooccurrence"]["search"] == 1
