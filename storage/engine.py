"""Engines and migrations: SQLite (WAL) by default, PostgreSQL in production."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "HEAD",
    "UnmigratedDatabaseError",
    "check_migrated",
    "current_revision",
    "make_engine",
    "session_factory",
    "upgrade",
]

MIGRATIONS = Path(__file__).with_name("migrations")
HEAD = "0003"


class UnmigratedDatabaseError(RuntimeError):
    """The database schema is missing or older than this version of the code."""


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _config(engine: Engine) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the shipped migrations (`guardrail db upgrade`)."""
    from alembic import command

    command.upgrade(_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def check_migrated(engine: Engine) -> None:
    """Raise `UnmigratedDatabaseError` unless the schema is at this code's revision."""
    revision = current_revision(engine)
    if revision != HEAD:
        where = engine.url.render_as_string(hide_password=True)
        found = "no schema" if revision is None else f"revision {revision}"
        tables = ", ".join(sorted(inspect(engine).get_table_names())) or "none"
        raise UnmigratedDatabaseError(
            f"database {where} has {found} (tables: {tables}); this version needs revision "
            f"{HEAD}: run `guardrail db upgrade`"
        )
