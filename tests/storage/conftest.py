"""Storage tests run on SQLite and on PostgreSQL.

PostgreSQL comes from `GUARDRAIL_TEST_POSTGRES_URL` (default: the local server at
127.0.0.1:5432, user postgres, database test); each test gets its own schema.  When it is not
reachable the PostgreSQL cases skip, unless `GUARDRAIL_REQUIRE_POSTGRES=1` (CI sets it) makes
them fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from storage.engine import make_engine
from tests.postgres import schema_url


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'guardrail.db'}")
        yield engine
        engine.dispose()
        return
    with schema_url() as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()
