"""Seconds per masked-image evaluation: the reference implementation's way against ours.

For the shipped reference model (36 image tokens), a tiny random LLaVA with 256 image tokens, a
tiny random Qwen2.5-VL with 64 and a tiny random InternVL with InternVL3's tile geometry (one
448 x 448 base tile, 14 px patches, pixel shuffle: 256 tokens), built from configs with no
download, on the same sample and the same masks:

  (a) reference way: pixel-space mask, image processor and one full forward per masked image
  (b) batched torch: the same, `--chunk` images per forward
  (c) ours: tensor-space masks, ONNX Runtime vision encoder, the text before the image cached,
      logits only at the target rows, `--chunk` variants per pass (Qwen2.5-VL: its vision
      tower exported for the sample's input size, see
      `detectors.scorers.families.qwen2_5_vl_vision`; InternVL: tower, pixel shuffle and
      projector exported for its base tile)

It prints the seconds per masked image, the speed-ups, the largest probability difference
between (a) and (c), where (c)'s time goes (vision, language model, masking and Python
overhead), (c) at several chunk sizes, and Qwen2.5-VL's vision tower alone three ways
(transformers' own, our batched fixed-geometry tower in torch and in ONNX Runtime).

    python benchmarks/scorer_speed.py            # table
    python benchmarks/scorer_speed.py --json     # one JSON object
    python benchmarks/scorer_speed.py --device cuda   # on a GPU (ORT CUDA provider)
    python benchmarks/scorer_speed.py --models tiny-internvl   # only the InternVL row
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detectors import Fill, Target
from detectors.reference import CAPTION_PROMPT, MODEL_DIR, SceneKind, generate_scene
from detectors.regions import slic_partition
from detectors.scorers import MaskedBatch
from detectors.scorers.families import family_named
from detectors.scorers.families.internvl import InternVLModel, load_internvl
from detectors.scorers.families.llava import (
    FastLlavaScorer,
    LlavaModel,
    LlavaScorer,
    llava_onnx_vision,
    load_llava,
)
from detectors.scorers.families.qwen2_5_vl import (
    FastQwenScorer,
    QwenModel,
    QwenScorer,
    load_qwen,
    qwen_onnx_vision,
)
from detectors.scorers.fast import TensorMaskedScorer, Timings
from detectors.scorers.onnx_export import export_vision
from detectors.scorers.protocol import Scorer
from guardrail.reference.tiny_models import (
    INTERNVL_PROMPT,
    LLAVA_PROMPT,
    QWEN_PROMPT,
    save_tiny_internvl,
    save_tiny_llava,
    save_tiny_qwen,
)


def _seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm up (first-call allocations, ORT graph optimisation)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _sample(name: str, llava: LlavaModel) -> tuple[np.ndarray, str, list[int], list[Target]]:
    if name == "reference":
        scene = generate_scene(11_000_003, SceneKind.CLEAN)
        said = llava.generate(scene.image, CAPTION_PROMPT)
        ids = list(said.token_ids)
        targets = [
            Target(position=i, token_id=t, text=llava.tokenizer.decode([t]))
            for i, t in enumerate(ids[:-1])
        ]
        return scene.image, CAPTION_PROMPT, ids, targets
    image = np.random.default_rng(3).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    words = ["a", "dog", "on", "a", "table", "."]
    ids = [int(llava.tokenizer.convert_tokens_to_ids(w)) for w in words]
    targets = [Target(position=i, token_id=ids[i], text=words[i]) for i in (1, 4)]
    return image, LLAVA_PROMPT, ids, targets


def bench_model(
    name: str, llava: LlavaModel, onnx_path: Path, args: argparse.Namespace
) -> dict[str, Any]:
    image, prompt, ids, targets = _sample(name, llava)
    vision = llava_onnx_vision(llava, onnx_path, device=args.device)
    return _bench(
        name,
        image,
        targets,
        plain=LlavaScorer(llava, image, prompt, ids, max_batch_size=1),
        batched=LlavaScorer(llava, image, prompt, ids, max_batch_size=args.chunk),
        ours=lambda chunk: FastLlavaScorer(
            llava, image, prompt, ids, vision=vision, chunk_size=chunk
        ),
        args=args,
    )


def bench_qwen(
    name: str, qwen: QwenModel, image: np.ndarray, onnx_path: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """A tiny random Qwen2.5-VL, its vision tower exported for `image`'s input size."""
    words = ["a", "dog", "on", "a", "table", "."]
    ids = [int(qwen.tokenizer.convert_tokens_to_ids(w)) for w in words]
    targets = [Target(position=i, token_id=ids[i], text=words[i]) for i in (1, 4)]
    vision = qwen_onnx_vision(qwen, onnx_path, qwen.input_hw(image), device=args.device)
    return _bench(
        name,
        image,
        targets,
        plain=QwenScorer(qwen, image, QWEN_PROMPT, ids, max_batch_size=1),
        batched=QwenScorer(qwen, image, QWEN_PROMPT, ids, max_batch_size=args.chunk),
        ours=lambda chunk: FastQwenScorer(
            qwen, image, QWEN_PROMPT, ids, vision=vision, chunk_size=chunk
        ),
        args=args,
    )


def bench_internvl(
    name: str,
    internvl: InternVLModel,
    image: np.ndarray,
    onnx_path: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """A tiny random InternVL on its base tile, through the family seam."""
    family = family_named("internvl")
    words = ["a", "dog", "on", "a", "table", "."]
    ids = [int(internvl.tokenizer.convert_tokens_to_ids(w)) for w in words]
    targets = [Target(position=i, token_id=ids[i], text=words[i]) for i in (1, 4)]
    vision = family.open_visions(internvl, onnx_path, device=args.device)[internvl.tile_hw]
    prompt = INTERNVL_PROMPT

    def ours(chunk: int) -> Any:
        return family.fast_scorer(internvl, image, prompt, ids, vision=vision, chunk_size=chunk)

    return _bench(
        name,
        image,
        targets,
        plain=family.plain_scorer(internvl, image, prompt, ids, max_batch_size=1),
        batched=family.plain_scorer(internvl, image, prompt, ids, max_batch_size=args.chunk),
        ours=ours,
        args=args,
    )


def bench_qwen_tower(
    qwen: QwenModel, image: np.ndarray, onnx_path: Path, args: argparse.Namespace
) -> dict[str, float]:
    """ms per `--chunk` images through Qwen2.5-VL's vision tower: transformers' own (patches
    concatenated, per-image windows in Python), our batched fixed-geometry one in torch, and
    that one exported to ONNX Runtime."""
    import torch

    from detectors.scorers.families.qwen2_5_vl import patchify
    from detectors.scorers.families.qwen2_5_vl_vision import qwen_vision_module

    hw = qwen.input_hw(image)
    config = qwen.model.config.vision_config
    patch, merge = int(config.patch_size), int(config.spatial_merge_size)
    device = next(qwen.model.parameters()).device
    pixels = torch.randn(args.chunk, 3, *hw, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device)
    patches = patchify(pixels, patch, merge, int(config.temporal_patch_size))
    grid = torch.tensor([[1, hw[0] // patch, hw[1] // patch]] * args.chunk, device=device)
    batched = qwen_vision_module(qwen.model, hw)
    vision = qwen_onnx_vision(qwen, onnx_path, hw, device=args.device)
    repeats = max(5, args.repeats)
    with torch.inference_mode():
        runs = {
            "transformers_torch": lambda: qwen.model.model.visual(patches, grid_thw=grid),
            "batched_torch": lambda: batched(pixels),
            "batched_onnx": lambda: vision(pixels),
        }
        return {name: _seconds(fn, repeats) * 1e3 for name, fn in runs.items()}


def _bench(
    name: str,
    image: np.ndarray,
    targets: list[Target],
    *,
    plain: Scorer,
    batched: Scorer,
    ours: Callable[[int], TensorMaskedScorer],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """(a) `plain` one image per call, (b) `batched` `args.chunk` per call, (c) `ours`."""
    partition = slic_partition(image, 48)
    rng = np.random.default_rng(0)
    keep = rng.random((args.variants, partition.n_regions)) < 0.5
    batch = MaskedBatch(image=image, partition=partition, keep=keep, fill=Fill.MEAN)
    rows = [
        MaskedBatch(image=image, partition=partition, keep=keep[i : i + 1], fill=Fill.MEAN)
        for i in range(args.variants)
    ]

    def run_a() -> np.ndarray:
        return np.concatenate([plain.score(r, targets) for r in rows])

    def run_b() -> np.ndarray:
        return np.concatenate(
            [
                batched.score(
                    MaskedBatch(
                        image=image,
                        partition=partition,
                        keep=keep[i : i + args.chunk],
                        fill=Fill.MEAN,
                    ),
                    targets,
                )
                for i in range(0, args.variants, args.chunk)
            ]
        )

    fast = ours(args.chunk)
    diff = float(np.abs(run_a() - fast.score(batch, targets)).max())
    a = _seconds(run_a, args.repeats) / args.variants
    b = _seconds(run_b, args.repeats) / args.variants
    fast = ours(args.chunk)
    fast.score(batch, targets)
    fast.timings = fast.lm.timings = Timings()
    wall = 0.0
    for _ in range(args.repeats):
        started = time.perf_counter()
        fast.score(batch, targets)
        wall += time.perf_counter() - started
    t = fast.timings
    c = wall / (args.repeats * args.variants)
    models = t.vision + t.decoder_forward  # the two models' own forward passes
    chunks = {}
    for chunk in args.chunks:
        scorer = ours(chunk)
        chunks[str(chunk)] = _seconds(lambda s=scorer: s.score(batch, targets), args.repeats) / (
            args.variants
        )
    return {
        "model": name,
        "image_tokens": fast.lm.image_tokens,
        "targets": len(targets),
        "variants": args.variants,
        "scorer": fast.name,
        "seconds_per_image": {"a_reference": a, "b_batched_torch": b, "c_ours": c},
        "speedup_a_over_c": a / c,
        "speedup_b_over_c": b / c,
        "max_abs_prob_diff": diff,
        "breakdown_share": {
            "vision": t.vision / wall,
            "language_model": t.language_model / wall,
            "masking": t.masking / wall,
            "language_model_forward": t.decoder_forward / wall,
            "python_overhead": max(0.0, wall - t.vision - t.language_model - t.masking) / wall,
        },
        "overhead_share": max(0.0, wall - models) / wall,
        "chunk_seconds_per_image": chunks,
    }


MODELS = ("reference", "tiny-llava-256", "tiny-qwen2.5-vl", "tiny-internvl")


def _run_row(name: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build the model of one row (no download), export its vision tower, and bench it."""
    if name in ("reference", "tiny-llava-256"):
        llava = load_llava(
            MODEL_DIR
            if name == "reference"
            else save_tiny_llava(tmp / "tiny", image_size=128, patch_size=8)
        )
        onnx_path = tmp / f"{name}.onnx"
        export_vision(llava, onnx_path, fuse=args.fuse)  # exported and verified on CPU
        llava.model.to(args.device)
        return bench_model(name, llava, onnx_path, args)
    if name == "tiny-qwen2.5-vl":
        qwen = load_qwen(save_tiny_qwen(tmp / "qwen", image_size=224))
        image = np.random.default_rng(3).integers(0, 255, (224, 224, 3), dtype=np.uint8)
        onnx_path = tmp / "qwen.onnx"
        export_vision(qwen, onnx_path, real_images=[image], fuse=args.fuse)
        qwen.model.to(args.device)
        row = bench_qwen(name, qwen, image, onnx_path, args)
        row["vision_tower_ms_per_chunk"] = bench_qwen_tower(qwen, image, onnx_path, args)
        return row
    internvl = load_internvl(save_tiny_internvl(tmp / "internvl", image_size=448, patch_size=14))
    image = np.random.default_rng(3).integers(0, 255, (448, 448, 3), dtype=np.uint8)
    onnx_path = tmp / "internvl.onnx"
    export_vision(internvl, onnx_path, real_images=[image], fuse=args.fuse)
    internvl.model.to(args.device)
    return bench_internvl(name, internvl, image, onnx_path, args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", type=int, default=64, help="masked images per model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=16, help="variants per forward in (b), (c)")
    parser.add_argument("--chunks", default="4,8,16,32,64", help="chunk sizes to compare for (c)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated rows to run, of: {', '.join(MODELS)}",
    )
    parser.add_argument(
        "--no-fuse",
        dest="fuse",
        action="store_false",
        help="export the vision towers without ONNX Runtime's fused kernels (to compare)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--json-out", type=Path, help="also write the JSON object here")
    args = parser.parse_args(argv)
    args.chunks = [int(c) for c in args.chunks.split(",") if c]
    wanted = [m for m in args.models.split(",") if m]
    unknown = sorted(set(wanted) - set(MODELS))
    if unknown or not wanted:
        parser.error(f"--models takes some of {', '.join(MODELS)}, got: {args.models!r}")
    import torch

    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in (m for m in MODELS if m in wanted):
            results.append(_run_row(name, Path(tmp), args))
    reference = next((r for r in results if r["model"] == "reference"), None)
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
            "device": args.device,
            "torch": torch.__version__,
        },
        "results": results,
        "speedup_reference_model": reference["speedup_a_over_c"] if reference else None,
        "max_abs_prob_diff": max(r["max_abs_prob_diff"] for r in results),
        "overhead_share": reference["overhead_share"] if reference else None,
    }
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"scorer speed on {report['machine']['processor']}, {args.threads} threads, {args.device}"
    )
    print(
        f"{'model':<16}{'tokens':>7}{'(a) ms':>9}{'(b) ms':>9}{'(c) ms':>9}"
        f"{'a/c':>7}{'b/c':>7}{'max|dp|':>10}{'vision':>8}{'LM':>7}{'mask':>7}{'py':>7}"
    )
    for r in results:
        s, share = r["seconds_per_image"], r["breakdown_share"]
        print(
            f"{r['model']:<16}{r['image_tokens']:>7}{s['a_reference'] * 1e3:>9.2f}"
            f"{s['b_batched_torch'] * 1e3:>9.2f}{s['c_ours'] * 1e3:>9.2f}"
            f"{r['speedup_a_over_c']:>6.1f}x{r['speedup_b_over_c']:>6.1f}x"
            f"{r['max_abs_prob_diff']:>10.1e}{share['vision']:>8.0%}{share['language_model']:>7.0%}"
            f"{share['masking']:>7.0%}{share['python_overhead']:>7.0%}"
        )
    print(
        "\nshares of (c)'s wall time: vision = ONNX Runtime run; LM = language-model step, of "
        "which its own forward is "
        + ", ".join(
            f"{r['model']} {r['breakdown_share']['language_model_forward']:.0%}" for r in results
        )
        + "; overhead outside the two models' forwards: "
        + ", ".join(f"{r['model']} {r['overhead_share']:.0%}" for r in results)
    )
    print("\n(c) ms per masked image by chunk size")
    for r in results:
        cells = "  ".join(f"{k}: {v * 1e3:.2f}" for k, v in r["chunk_seconds_per_image"].items())
        print(f"{r['model']:<16}{cells}")
    for r in results:
        if "vision_tower_ms_per_chunk" in r:
            print(
                f"\nQwen2.5-VL vision tower, ms per {args.chunk} images: "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["vision_tower_ms_per_chunk"].items())
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
