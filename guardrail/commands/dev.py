"""`guardrail dev tiny-model FAMILY --out DIR`: a tiny random checkpoint of a model family.

For trying the export, explain and audit paths of a family end to end without its real weights:
the checkpoint (config, safetensors weights, tokenizer and image processor files) loads with
transformers from the local directory, with no download.  Its outputs are noise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(commands: Any) -> None:
    from detectors.scorers.families import FAMILY_NAMES

    dev = commands.add_parser("dev", help="tools for developing and testing the guardrail")
    tools = dev.add_subparsers(dest="dev_command", metavar="TOOL", required=True)
    tiny = tools.add_parser(
        "tiny-model",
        help="write a tiny randomly initialised checkpoint of a model family",
        description=(
            "Write a tiny random checkpoint of FAMILY (config.json, safetensors weights, "
            "tokenizer and image processor files) that transformers loads from DIR with no "
            "download. The tokenizer is the shipped reference model's word-level vocabulary "
            "with the family's special tokens added."
        ),
    )
    tiny.add_argument("family", choices=FAMILY_NAMES, help="the model family")
    tiny.add_argument("--out", type=Path, required=True, help="the checkpoint directory")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default: %(default)s)")
    tiny.set_defaults(handler=_tiny_model)


def _tiny_model(args: argparse.Namespace) -> int:
    from detectors.reference import MODEL_DIR
    from detectors.scorers.families import family_of_checkpoint
    from guardrail.logs import quiet_progress_bars
    from guardrail.reference.tiny_models import TINY_BUILDERS

    quiet_progress_bars()
    out = TINY_BUILDERS[args.family](args.out, seed=args.seed, vocabulary=MODEL_DIR)
    family = family_of_checkpoint(out)  # what the guardrail will read back
    print(
        json.dumps(
            {
                "path": str(out),
                "family": family.name,
                "architecture": family.architecture,
                "image_placeholder": family.image_placeholder,
                "files": sorted(p.name for p in out.iterdir()),
            },
            indent=2,
        )
    )
    return 0
