"""The `guardrail` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from detectors.errors import DetectorError, RemoteUnavailableError
from detectors.types import DEFAULT_BUDGET_FRACTION
from guardrail import __version__
from guardrail.errors import GuardrailError
from storage.engine import UnmigratedDatabaseError, failed_database

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardrail",
        description="Hallucination guardrail for multimodal LLMs (EAGLE attribution).",
    )
    parser.add_argument("--version", action="version", version=f"guardrail {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    version = commands.add_parser("version", help="print the version")
    version.set_defaults(handler=lambda args: _print_version())

    case = commands.add_parser(
        "explain-case",
        help="explain one of the built-in analytic cases and print the verdicts",
    )
    case.add_argument("case", help="grounded, prior_driven, conjunctive or borrowed_evidence")
    case.add_argument("--regions", type=int, default=16, help="number of regions (grid)")
    case.add_argument(
        "--fraction",
        type=float,
        default=DEFAULT_BUDGET_FRACTION,
        help="budget as a fraction of the exact search's N(N+1) passes",
    )
    case.add_argument("--heatmap", metavar="PNG", help="write the saliency heatmap here")
    case.set_defaults(handler=_explain_case)

    from guardrail.commands.db import register as register_db
    from guardrail.commands.dev import register as register_dev
    from guardrail.commands.explain import register as register_explain
    from guardrail.commands.export import register as register_export
    from guardrail.commands.probe import register as register_probe
    from guardrail.commands.report import register as register_report
    from guardrail.commands.serve import register as register_serve
    from guardrail.demo.run import register as register_demo
    from guardrail.reference.commands import register as register_reference

    register_explain(commands)
    register_db(commands)
    register_serve(commands)
    register_report(commands)
    register_demo(commands)
    register_export(commands)
    register_reference(commands)
    register_probe(commands)
    register_dev(commands)
    return parser


def _print_version() -> int:
    print(f"guardrail {__version__}")
    return 0


def _explain_case(args: argparse.Namespace) -> int:
    from guardrail.commands.case import explain_case

    print(explain_case(args.case, args.regions, args.fraction, args.heatmap))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        _print_version()
        parser.print_help()
        return 0
    try:
        return int(args.handler(args))
    except (
        GuardrailError,  # PermanentError (bad input, bad config) and RetryableError
        DetectorError,
        RemoteUnavailableError,
        ValueError,
        OSError,
        UnmigratedDatabaseError,
    ) as exc:
        print(f"{type(exc).__name__}: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except (ArgumentError, OperationalError) as exc:
        # a database URL that cannot be used, or a database that cannot be reached; other
        # SQLAlchemy errors (and these from anywhere but our engines) are bugs: traceback
        if failed_database(exc) is None:
            raise
        print(f"{type(exc).__name__}: {database_error(exc)}", file=sys.stderr)
        return 2


def database_error(exc: ArgumentError | OperationalError) -> str:
    """One line for a database URL or connection failure, naming the database (password
    masked) and what to check."""
    if not isinstance(exc, DBAPIError):
        return _one_line(str(exc))  # make_engine's message names the masked URL already
    where = failed_database(exc) or "?"
    reason = _one_line(str(exc.orig) if exc.orig is not None else str(exc))
    check = (
        "that its directory exists and is writable"
        if where.startswith("sqlite")
        else "that the server is running and reachable and the credentials are right"
    )
    return (
        f"cannot use the database {where}: {reason} (check the URL given by --url, "
        f"GUARDRAIL_DATABASE_URL or database_url in the config file, and {check})"
    )


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())
