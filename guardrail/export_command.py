"""`guardrail export-vision MODEL_DIR --out FILE.onnx`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(commands: Any) -> None:
    export = commands.add_parser(
        "export-vision",
        help="export a LLaVA checkpoint's vision tower + projector to ONNX (verified vs torch)",
    )
    export.add_argument("model_dir", type=Path, help="local LLaVA checkpoint directory")
    export.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    export.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        help="a real image to verify with (repeatable; default: two reference scenes)",
    )
    export.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff allowed")
    export.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from detectors.reference import SceneKind, generate_scene
    from detectors.scorers.llava import load_llava
    from detectors.scorers.onnx_export import export_vision
    from guardrail.images import read_image

    llava = load_llava(args.model_dir)
    images = [read_image(p) for p in args.image] or [
        generate_scene(11_000_000 + i, SceneKind.CLEAN).image for i in range(2)
    ]
    report = export_vision(llava, args.out, real_images=images, tolerance=args.tolerance)
    print(
        json.dumps(
            {
                "path": str(report.path),
                "bytes": report.bytes,
                "fingerprint": report.fingerprint,
                "input_shape": list(report.input_shape),
                "output_shape": list(report.output_shape),
                "max_abs_diff_random": report.max_abs_diff_random,
                "max_abs_diff_real": report.max_abs_diff_real,
            },
            indent=2,
        )
    )
    return 0
