"""Engines and migrations: SQLite (WAL) by default, PostgreSQL in production."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "HEAD",
    "UnmigratedDatabaseError",
    "check_migrated",
    "current_revision",
    "downgrade",
    "failed_database",
    "make_engine",
    "masked_url",
    "session_factory",
    "upgrade",
]

MIGRATIONS = Path(__file__).with_name("migrations")
HEAD = "0008"


class UnmigratedDatabaseError(RuntimeError):
    """The database schema is missing or older than this version of the code."""


# query parameters of a database URL that carry credentials (libpq: password, sslpassword)
_SECRET_QUERY = re.compile(r"pass|pwd|secret|token|key", re.IGNORECASE)
# `scheme://user:password@` anywhere in a text that SQLAlchemy could not parse as a URL
# up to the last "@" of the authority: an unescaped "@" in a password is masked whole
_USERINFO_PASSWORD = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^:/@\s]*:)[^/\s]*@")


def masked_url(url: str) -> str:
    """`url` with its password (and credential query parameters) replaced by `***`.

    Works on text that is not a valid URL too (the password of `scheme://user:password@`
    is masked wherever it occurs), so it is safe for error messages about malformed URLs.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # e.g. an unescaped "@" in the password: bad port
        return _USERINFO_PASSWORD.sub(r"\g<head>***@", url)
    if parsed.query:
        parsed = parsed.update_query_dict(
            {k: "***" for k in parsed.query if _SECRET_QUERY.search(k)}
        )
    # render_as_string percent-encodes the query's mask
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def _where(engine: Engine) -> str:
    return masked_url(engine.url.render_as_string(hide_password=False))


def failed_database(exc: BaseException) -> str | None:
    """The (masked) URL of the database whose driver raised `exc`, when an engine made by
    `make_engine` saw it: driver messages often name neither the database nor the server."""
    database = getattr(exc, "guardrail_database", None)
    return database if isinstance(database, str) else None


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys and a busy timeout.

    Raises:
        sqlalchemy.exc.ArgumentError: `url` is not a database URL, or names a dialect or
            driver that is not installed (`NoSuchModuleError`); the message shows the URL with
            its password masked.
    """
    try:
        engine = _create(url, **kwargs)
    except (ArgumentError, ValueError, ImportError) as exc:
        # ValueError: make_url's int() of a port that holds half a password; ImportError: a
        # driver that is not installed; never show the raw message (it may hold the password)
        kind = type(exc) if isinstance(exc, ArgumentError) else ArgumentError
        detail = str(exc) if isinstance(exc, ArgumentError) else type(exc).__name__
        if isinstance(exc, ImportError):
            detail = f"its driver is not installed: {exc.name or exc}"
        error = kind(
            f"database URL {masked_url(url)!r} is not usable ({detail}); expected "
            "dialect+driver://user:password@host:port/database, e.g. sqlite:///guardrail.db "
            "or postgresql+psycopg://guardrail:password@127.0.0.1:5432/guardrail"
        )
        error.guardrail_database = masked_url(url)  # type: ignore[attr-defined]
        raise error from None
    where = masked_url(url)

    @event.listens_for(engine, "handle_error")
    def _name_the_database(context: ExceptionContext) -> None:
        # recorded on the exception so the CLI can say which database failed
        for raised in (context.sqlalchemy_exception, context.original_exception):
            if raised is not None:
                raised.guardrail_database = where  # type: ignore[attr-defined]

    return engine


def _create(url: str, **kwargs: Any) -> Engine:
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
    if url.startswith("postgresql") and "connect_args" not in kwargs:
        # a blackholed host, a locked table or a runaway query must not hold a request, a
        # probe or a scrape for minutes: they fail (ingest answers 503) and are retried
        ours = "-c lock_timeout=5000 -c statement_timeout=60000"
        theirs = make_url(url).query.get("options")  # connect_args replace the URL's: merge
        theirs = theirs if isinstance(theirs, str) else " ".join(theirs or ())
        args: dict[str, Any] = {"options": f"{ours} {theirs}".strip()}  # theirs win
        if "connect_timeout" not in url:
            args["connect_timeout"] = 5
        kwargs["connect_args"] = args
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


def downgrade(engine: Engine, revision: str) -> None:
    """Undo migrations down to `revision` ("base": an empty schema)."""
    from alembic import command

    command.downgrade(_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    """The schema revision recorded by Alembic, or None before the first `upgrade`.

    Read directly (every readiness probe calls this): Alembic's `MigrationContext` would log
    two INFO lines per call.
    """
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        revisions = list(
            connection.execute(text("SELECT version_num FROM alembic_version")).scalars()
        )
    if len(revisions) > 1:
        raise UnmigratedDatabaseError(
            f"database {_where(engine)} records several schema revisions "
            f"({', '.join(sorted(revisions))}); expected one: {HEAD}"
        )
    return revisions[0] if revisions else None


def check_migrated(engine: Engine) -> None:
    """Raise `UnmigratedDatabaseError` unless the schema is at this code's revision."""
    revision = current_revision(engine)
    if revision != HEAD:
        where = _where(engine)
        found = "no schema" if revision is None else f"revision {revision}"
        tables = ", ".join(sorted(inspect(engine).get_table_names())) or "none"
        raise UnmigratedDatabaseError(
            f"database {where} has {found} (tables: {tables}); this version needs revision "
            f"{HEAD}: run `guardrail db upgrade`"
        )
