"""The fast scorers' masking blend: the dense soft-mask product against `RegionShares`.

Every masked variant the fast scorers build is `fill + share * (base - fill)`, where `share` is
the part of every input pixel its kept regions hold.  The old way computed it as a dense
`(b, R) x (R, h*w)` product with the soft region masks; ours gathers a region id per pixel and
keeps the dense product for the band of pixels that a resize mixes.  On the same inputs, in one
process, repeats interleaved, it prints the median ms per chunk of:

  dense         keep @ soft, then addcmul into a fresh tensor (the old `_blend`)
  shares        RegionShares.kept, then addcmul into a fresh tensor (the new `_blend`)
  shares+out    the same, written into buffers reused from chunk to chunk

for InternVL's base tile (448 x 448, 48 SLIC regions) without a resize (a 448 x 448 image)
and with one (640 x 480 -> 448 x 448), and the largest difference from the dense blend.

    python benchmarks/blend_speed.py            # table
    python benchmarks/blend_speed.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from detectors.regions import slic_partition
from detectors.scorers.tensor_masks import InputGeometry, region_shares, soft_region_masks

CASES = {"identity": (448, 448), "resized": (480, 640)}


def bench_case(name: str, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    hw = (448, 448)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (*CASES[name], 3), dtype=np.uint8)
    partition = slic_partition(image, args.regions)
    geometry = InputGeometry.resize_to(hw)
    soft = torch.from_numpy(soft_region_masks(partition, geometry).reshape(partition.n_regions, -1))
    shares = region_shares(partition, geometry)
    keep = torch.from_numpy((rng.random((rows, partition.n_regions)) < 0.5).astype(np.float32))
    fill = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    diff = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(1))
    share_out = torch.empty(rows, hw[0] * hw[1])
    blend_out = torch.empty(rows, 3, *hw)

    def dense() -> Any:
        return torch.addcmul(fill, (keep @ soft).view(rows, 1, *hw), diff)

    def ours() -> Any:
        return torch.addcmul(fill, shares.kept(keep).view(rows, 1, *hw), diff)

    def ours_out() -> Any:
        share = shares.kept(keep, out=share_out).view(rows, 1, *hw)
        return torch.addcmul(fill, share, diff, out=blend_out)

    runs: dict[str, Callable[[], Any]] = {"dense": dense, "shares": ours, "shares+out": ours_out}
    want = dense()
    diffs = {k: float((fn() - want).abs().max()) for k, fn in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            started = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - started)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "case": name,
        "image_hw": list(CASES[name]),
        "rows": rows,
        "regions": partition.n_regions,
        "band_share": int(shares.band.numel()) / (hw[0] * hw[1]),
        "ms_per_chunk": ms,
        "speedup_over_dense": {k: ms["dense"] / v for k, v in ms.items()},
        "max_abs_diff_from_dense": diffs,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="16,64", help="variants per chunk to compare")
    parser.add_argument("--regions", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = [
        bench_case(name, int(rows), args) for name in CASES for rows in args.rows.split(",") if rows
    ]
    report = {
        "machine": {"platform": platform.platform(), "threads": args.threads},
        "torch": torch.__version__,
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"masking blend, ms per chunk (median of {args.repeats}), {args.threads} threads")
    print(
        f"{'case':<10}{'rows':>5}{'band':>7}{'dense':>9}{'shares':>9}{'+out':>9}"
        f"{'x':>7}{'x+out':>7}{'max|d|':>10}"
    )
    for r in results:
        ms, x = r["ms_per_chunk"], r["speedup_over_dense"]
        worst = max(r["max_abs_diff_from_dense"].values())
        print(
            f"{r['case']:<10}{r['rows']:>5}{r['band_share']:>7.1%}{ms['dense']:>9.2f}"
            f"{ms['shares']:>9.2f}{ms['shares+out']:>9.2f}{x['shares']:>6.1f}x"
            f"{x['shares+out']:>6.1f}x{worst:>10.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
