"""`guardrail db upgrade|current`: the database schema (Alembic migrations shipped with the
package)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


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
            help="SQLAlchemy URL (default: database_url as the other commands resolve it: "
            "env GUARDRAIL_DATABASE_URL, then the config file, then sqlite:///guardrail.db)",
        )
        command.add_argument("--config", help="TOML file (default: $GUARDRAIL_CONFIG)")
        command.set_defaults(handler=_upgrade if name == "upgrade" else _current)


def _url(args: argparse.Namespace) -> str:
    """`--url`, else the configured database URL (only that key: the models need not exist
    where migrations run)."""
    if args.url:
        return str(args.url)
    from guardrail.config import database_url

    return database_url(args.config)


def _upgrade(args: argparse.Namespace) -> int:
    from storage.engine import current_revision, make_engine, masked_url, upgrade

    url = _url(args)
    engine = make_engine(url)
    upgrade(engine)
    where = masked_url(url)
    print(f"{where}: schema at revision {current_revision(engine)}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from storage.engine import HEAD, current_revision, make_engine, masked_url

    url = _url(args)
    engine = make_engine(url)
    revision = current_revision(engine)
    where = masked_url(url)
    state = "up to date" if revision == HEAD else f"needs `guardrail db upgrade` (head {HEAD})"
    print(f"{where}: revision {revision or 'none'}, {state}")
    return 0 if revision == HEAD else 1
