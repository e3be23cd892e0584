"""PostgreSQL for the tests: the local server, one fresh schema per use.

`GUARDRAIL_TEST_POSTGRES_URL` (default: 127.0.0.1:5432, user postgres, database test).  When it
is not reachable the test skips, unless `GUARDRAIL_REQUIRE_POSTGRES=1` (CI) makes it fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import text

from storage.engine import make_engine

POSTGRES_URL = os.environ.get(
    "GUARDRAIL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def require_postgres() -> None:
    """Skip (or fail, in CI) unless PostgreSQL answers."""
    try:
        engine = make_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:  # any driver or network error means: not reachable
        if os.environ.get("GUARDRAIL_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL at {POSTGRES_URL} is required but not reachable: {exc}")
        pytest.skip(f"PostgreSQL not reachable: {exc}")


@contextmanager
def schema_url(prefix: str = "gr_test") -> Iterator[str]:
    """A URL whose connections use a fresh schema, dropped afterwards."""
    require_postgres()
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f"create schema {schema}"))
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"drop schema {schema} cascade"))
        admin.dispose()
