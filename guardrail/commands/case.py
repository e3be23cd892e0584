"""`guardrail explain-case`: the attribution core on a built-in analytic case, end to end."""

from __future__ import annotations

import math

import numpy as np

import detectors
from detectors.heatmap import overlay, save_png
from detectors.scorers import analytic_case

__all__ = ["explain_case"]


def explain_case(name: str, n_regions: int, fraction: float, heatmap: str | None) -> str:
    """Run `detectors.explain` on a named analytic case over a grid; return a printable table."""
    case = analytic_case(name, n_regions)
    rows = max(1, math.isqrt(n_regions))
    while n_regions % rows:
        rows -= 1
    cols = n_regions // rows
    image = _checkerboard(rows * 24, cols * 24)
    partition = detectors.grid_partition(image, rows, cols)
    budget = detectors.SearchBudget.fraction_of_exact(n_regions, fraction)
    result = detectors.explain(image, case.scorer, case.targets, budget=budget, partition=partition)
    lines = [
        f"case {case.name}: {case.description}",
        f"{'token':>8} {'verdict':>18} {'expected':>18} {'p_full':>7} {'p_blank':>7} "
        f"{'necessity':>9} {'prior':>6} {'passes':>6}  compact set",
    ]
    for verdict, attribution, expected in zip(
        result.verdicts, result.attributions, case.expected, strict=True
    ):
        lines.append(
            f"{verdict.target.text:>8} {verdict.label.value:>18} {expected.value:>18} "
            f"{verdict.p_full:7.3f} {verdict.p_blank:7.3f} {verdict.necessity:9.3f} "
            f"{verdict.prior_score:6.2f} {attribution.forward_passes:6d}  "
            f"{list(verdict.compact_set)}"
        )
    if heatmap:
        save_png(overlay(image, result.attributions[0]), heatmap)
        lines.append(f"heatmap written to {heatmap}")
    return "\n".join(lines)


def _checkerboard(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    tone = (((yy // 24) + (xx // 24)) % 2 * 60 + 100).astype(np.uint8)
    return np.stack([tone, tone, tone], axis=-1)
