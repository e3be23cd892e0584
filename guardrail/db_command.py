"""`guardrail db upgrade|current`: the database schema (Alembic migrations shipped with the
package)."""

from __future__ import annotations

import argparse
import os
from typing import Any

__all__ = ["DEFAULT_DATABASE_URL", "register"]

DEFAULT_DATABASE_URL = "sqlite:///guardrail.db"


def register(commands: Any) -> None:
    db = commands.add_parser("db", help="database schema: upgrade, current")
    sub = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    for name, help_text in (
        ("upgrade", "apply the shipped migrations"),
        ("current", "print the schema revision"),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument(
            "--url",
            default=os.environ.get("GUARDRAIL_DATABASE_URL", DEFAULT_DATABASE_URL),
            help="SQLAlchemy URL (env GUARDRAIL_DATABASE_URL; default sqlite:///guardrail.db)",
        )
        command.set_defaults(handler=_upgrade if name == "upgrade" else _current)


def _upgrade(args: argparse.Namespace) -> int:
    from storage.engine import current_revision, make_engine, masked_url, upgrade

    engine = make_engine(args.url)
    upgrade(engine)
    where = masked_url(args.url)
    print(f"{where}: schema at revision {current_revision(engine)}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from storage.engine import HEAD, current_revision, make_engine, masked_url

    engine = make_engine(args.url)
    revision = current_revision(engine)
    where = masked_url(args.url)
    state = "up to date" if revision == HEAD else f"needs `guardrail db upgrade` (head {HEAD})"
    print(f"{where}: revision {revision or 'none'}, {state}")
    return 0 if revision == HEAD else 1
