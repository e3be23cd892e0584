"""The `guardrail` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from detectors.errors import DetectorError
from guardrail import __version__

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardrail",
        description="Hallucination guardrail for multimodal LLMs (EAGLE attribution).",
    )
    parser.add_argument("--version", action="version", version=f"guardrail {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("version", help="print the version")
    explain = commands.add_parser(
        "explain-case",
        help="explain one of the built-in analytic cases and print the verdicts",
    )
    explain.add_argument("case", help="grounded, prior_driven, conjunctive or borrowed_evidence")
    explain.add_argument("--regions", type=int, default=16, help="number of regions (grid)")
    explain.add_argument(
        "--fraction",
        type=float,
        default=0.10,
        help="budget as a fraction of the exact search's N(N+1) passes",
    )
    explain.add_argument("--heatmap", metavar="PNG", help="write the saliency heatmap here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in (None, "version"):
            print(f"guardrail {__version__}")
            if args.command is None:
                parser.print_help()
            return 0
        if args.command == "explain-case":
            from guardrail.cases import explain_case

            print(explain_case(args.case, args.regions, args.fraction, args.heatmap))
            return 0
    except (DetectorError, ValueError, OSError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2
