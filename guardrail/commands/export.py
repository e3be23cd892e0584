"""`guardrail export-vision MODEL_DIR --out FILE.onnx`."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, got {text!r}")
    return int(match[1]), int(match[2])


def register(commands: Any) -> None:
    export = commands.add_parser(
        "export-vision",
        help="export a checkpoint's vision encoder to ONNX (verified against torch)",
        description=(
            "Export the vision tower and projector (LLaVA), merger (Qwen2.5-VL) or pixel "
            "shuffle and projector (InternVL, its base tile) to ONNX with "
            "a dynamic batch axis, check it against torch on random and real inputs, and write "
            "it only if it agrees. A Qwen2.5-VL file serves one input size (--input-size, or "
            "the size the first --image is processed to); other sizes fall back to torch."
        ),
    )
    export.add_argument(
        "model_dir", type=Path, help="local LLaVA, Qwen2.5-VL or InternVL checkpoint"
    )
    export.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    export.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        help="a real image to verify with (repeatable; default: two reference scenes)",
    )
    export.add_argument(
        "--input-size",
        type=_size,
        metavar="HxW",
        help="Qwen2.5-VL: the processed input size to export for (multiples of 28)",
    )
    export.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff allowed")
    export.add_argument(
        "--no-fuse",
        dest="fuse",
        action="store_false",
        help="keep the graph as torch exports it (default: attention and normalisation "
        "rewritten to ONNX Runtime's fused kernels, checked against torch like the rest)",
    )
    export.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from detectors.reference import SceneKind, generate_scene
    from detectors.scorers.families import family_of_checkpoint
    from detectors.scorers.onnx_export import export_vision
    from guardrail.service.images import read_image

    family = family_of_checkpoint(args.model_dir)
    model = family.load(args.model_dir)
    images = [read_image(p) for p in args.image] or [
        generate_scene(11_000_000 + i, SceneKind.CLEAN).image for i in range(2)
    ]
    report = export_vision(
        model,
        args.out,
        real_images=images,
        input_hw=args.input_size,
        tolerance=args.tolerance,
        fuse=args.fuse,
    )
    print(
        json.dumps(
            {
                "path": str(report.path),
                "family": family.name,
                "bytes": report.bytes,
                "files": [str(f) for f in report.files],
                "fingerprint": report.fingerprint,
                "input_shape": list(report.input_shape),
                "output_shape": list(report.output_shape),
                "max_abs_diff_random": report.max_abs_diff_random,
                "max_abs_diff_real": report.max_abs_diff_real,
                "fusions": report.fusions,
            },
            indent=2,
        )
    )
    return 0
