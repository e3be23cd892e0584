"""Wall seconds per explained object token: the reference-style pipeline against ours.

On reference-world samples and the shipped model:

  reference style: the paper's exact greedy search (N(N + 1) forward passes) scored the
                   reference implementation's way (pixel masks, processor and one full forward
                   per masked image)
  ours:            the budgeted search (`--fraction` of the exact passes) on the fast scorer
                   (tensor masks, ONNX vision, prefix KV cache, target-only logits)

Attainment compares the two orderings on the same objective (insertion + deletion areas,
re-scored for every prefix by the fast scorer, outside the timings): 1.0 = as good as the exact
search, 0 = no better than a random order, above 1 = better than the exact greedy order (a
heuristic too).  Reported per word (mean, median, min) and pooled (the summed margins over a
random order), which weighs words by how much there is to explain.

    python benchmarks/explain_speed.py            # table
    python benchmarks/explain_speed.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detectors import EagleSearch, Fill, SearchBudget, Target
from detectors.evaluation import objective_area as evaluation_area
from detectors.evaluation import order_curves
from detectors.objects import flag_objects
from detectors.reference import CAPTION_PROMPT, MODEL_DIR, SceneKind, generate_scene
from detectors.regions import RegionPartition, slic_partition
from detectors.scorers.families.llava import (
    FastLlavaScorer,
    LlavaModel,
    LlavaScorer,
    llava_onnx_vision,
    load_llava,
)
from detectors.scorers.onnx_export import export_vision
from guardrail.reference.evaluation import REFERENCE_VOCABULARY


def objective_area(
    scorer: FastLlavaScorer,
    image: np.ndarray,
    partition: RegionPartition,
    target: Target,
    order: np.ndarray,
) -> float:
    curves = order_curves(scorer, image, partition, order, [target], fill=Fill.MEAN)
    return evaluation_area(*curves)


def explain_token(
    llava: LlavaModel, onnx: Path, seed: int, kind: SceneKind, args: argparse.Namespace
) -> list[dict[str, Any]]:
    scene = generate_scene(seed, kind)
    said = llava.generate(scene.image, CAPTION_PROMPT)
    ids = list(said.token_ids)
    mentions = list(flag_objects(ids, llava.tokenizer.decode, REFERENCE_VOCABULARY))
    partition = slic_partition(scene.image, args.regions)
    n = partition.n_regions
    rows = []
    for mention in mentions[: args.tokens_per_scene]:
        target = mention.target()
        plain = LlavaScorer(llava, scene.image, CAPTION_PROMPT, ids, max_batch_size=1)
        vision = llava_onnx_vision(llava, onnx)
        fast = FastLlavaScorer(llava, scene.image, CAPTION_PROMPT, ids, vision=vision)
        started = time.perf_counter()
        exact = EagleSearch(plain, SearchBudget.exhaustive(batch_size=1), fill=Fill.MEAN)
        slow = exact.attribute(scene.image, partition, [target])
        slow_seconds = time.perf_counter() - started
        started = time.perf_counter()
        budget = SearchBudget.fraction_of_exact(n, args.fraction)
        ours_search = EagleSearch(fast, budget, fill=Fill.MEAN, stop_when_converged=False)
        ours = ours_search.attribute(scene.image, partition, [target])
        fast_seconds = time.perf_counter() - started
        rng = np.random.default_rng(seed)
        areas = {
            "exact": objective_area(fast, scene.image, partition, target, slow.order),
            "ours": objective_area(fast, scene.image, partition, target, ours.order),
            "random": float(
                np.mean(
                    [
                        objective_area(fast, scene.image, partition, target, rng.permutation(n))
                        for _ in range(4)
                    ]
                )
            ),
        }
        gap = areas["exact"] - areas["random"]
        attainment = (areas["ours"] - areas["random"]) / gap if gap > 1e-9 else 1.0
        rows.append(
            {
                "seed": seed,
                "kind": kind.value,
                "word": target.text,
                "regions": n,
                "reference_seconds": slow_seconds,
                "reference_passes": slow.forward_passes,
                "ours_seconds": fast_seconds,
                "ours_passes": ours.forward_passes,
                "speedup": slow_seconds / fast_seconds,
                "attainment": attainment,
                "areas": areas,
                "scorer": fast.name,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=6, help="reference scenes (kinds in turn)")
    parser.add_argument("--tokens-per-scene", type=int, default=2)
    parser.add_argument("--regions", type=int, default=48, help="SLICO regions")
    parser.add_argument("--fraction", type=float, default=0.10, help="our budget, share of exact")
    parser.add_argument("--first-seed", type=int, default=11_000_100, help="scene seeds from")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    llava = load_llava(MODEL_DIR)
    kinds = [SceneKind.CLEAN, SceneKind.COOCCURRENCE_TRAP, SceneKind.PRIOR_TRAP]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_vision(llava, Path(tmp) / "vision.onnx").path
        for i in range(args.scenes):
            rows += explain_token(llava, onnx, args.first_seed + i, kinds[i % len(kinds)], args)
    slow = sum(r["reference_seconds"] for r in rows)
    fast = sum(r["ours_seconds"] for r in rows)
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
        },
        "tokens": len(rows),
        "reference_seconds_per_token": slow / len(rows),
        "ours_seconds_per_token": fast / len(rows),
        "speedup": slow / fast,
        "attainment": float(np.mean([r["attainment"] for r in rows])),
        "attainment_median": float(np.median([r["attainment"] for r in rows])),
        "attainment_min": float(np.min([r["attainment"] for r in rows])),
        "attainment_pooled": float(
            sum(r["areas"]["ours"] - r["areas"]["random"] for r in rows)
            / sum(r["areas"]["exact"] - r["areas"]["random"] for r in rows)
        ),
        "reference_passes": float(np.mean([r["reference_passes"] for r in rows])),
        "ours_passes": float(np.mean([r["ours_passes"] for r in rows])),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"explain speed on {report['machine']['processor']}, {args.threads} threads")
    print(
        f"{'scene':<27}{'word':<8}{'N':>4}{'ref s':>9}{'passes':>8}{'ours s':>9}"
        f"{'passes':>8}{'speedup':>9}{'attain':>8}"
    )
    for r in rows:
        print(
            f"{r['kind'] + ' ' + str(r['seed']):<27}{r['word']:<8}{r['regions']:>4}"
            f"{r['reference_seconds']:>9.1f}{r['reference_passes']:>8}{r['ours_seconds']:>9.2f}"
            f"{r['ours_passes']:>8}{r['speedup']:>8.1f}x{r['attainment']:>8.3f}"
        )
    print(
        f"per token: reference {report['reference_seconds_per_token']:.1f} s, ours "
        f"{report['ours_seconds_per_token']:.2f} s, speedup {report['speedup']:.1f}x, "
        f"attainment {report['attainment']:.3f} (median {report['attainment_median']:.3f}, "
        f"min {report['attainment_min']:.3f}, pooled {report['attainment_pooled']:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
