"""Migrations up to head and back down, on an empty SQLite database and a PostgreSQL schema;
revision 0007 adds the provenance of attributions and verdicts to existing rows, 0008 the layout
of a sample of several images."""

from __future__ import annotations

import json

from sqlalchemy import Engine, inspect, text

from storage.engine import HEAD, current_revision, downgrade, upgrade

PROVENANCE = {
    "attributions": {"search_version", "weight_insight", "weight_necessity"},
    "verdicts": {"detector", "detector_version", "thresholds_id", "scorer_name"},
}


def _columns(engine: Engine, table: str) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns(table)}


def test_upgrade_to_head_and_downgrade_to_nothing(engine: Engine) -> None:
    upgrade(engine)
    assert current_revision(engine) == HEAD == "0008"
    for table, columns in PROVENANCE.items():
        assert columns <= _columns(engine, table), table
    assert "ix_verdicts_thresholds_id" in {
        i["name"] for i in inspect(engine).get_indexes("verdicts")
    }
    downgrade(engine, "0006")
    assert current_revision(engine) == "0006"
    for table, columns in PROVENANCE.items():
        assert not columns & _columns(engine, table), table
    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(engine)  # and up again from nothing
    assert current_revision(engine) == HEAD


def test_rows_stored_before_0007_keep_their_data_with_null_provenance(engine: Engine) -> None:
    upgrade(engine, "0006")
    with engine.begin() as connection:
        connection.execute(
            text(
                "insert into samples (id, model, received_at, status, image_sha256, image_width,"
                " image_height, generated_text, token_ids, extra) values ('s1', 'm',"
                " '2026-12-01 00:00:00', 'AUDITED', :sha, 8, 8, 'a fork .', '[1, 2]', '{}')"
            ),
            {"sha": "0" * 64},
        )
        connection.execute(
            text(
                "insert into flagged_tokens (id, sample_id, position, token_id, word, category)"
                " values (1, 's1', 1, 2, 'fork', 'fork')"
            )
        )
        connection.execute(
            text(
                "insert into verdicts (id, token_pk, label, prior_score, hallucination_score,"
                " reason, numbers, created_at) values (1, 1, 'grounded', 0.1, 0.2, 'r', '{}',"
                " '2026-12-01 00:00:00')"
            )
        )
    upgrade(engine)
    with engine.connect() as connection:
        row = connection.execute(
            text("select label, detector, detector_version, thresholds_id from verdicts")
        ).one()
    assert tuple(row) == ("grounded", None, None, None)


def test_0008_adds_the_image_layout_and_its_downgrade_keeps_the_samples(engine: Engine) -> None:
    upgrade(engine, "0007")
    assert "image_layout" not in _columns(engine, "samples")
    insert = text(
        "insert into samples (id, model, received_at, status, image_sha256, image_width,"
        " image_height, generated_text, token_ids, extra) values (:id, 'm',"
        " '2026-12-01 00:00:00', 'QUEUED', :sha, 112, 56, 'a cat', '[]', '{}')"
    )
    with engine.begin() as connection:
        connection.execute(insert, {"id": "before", "sha": "0" * 64})
    upgrade(engine)
    layout = '{"canvas": [56, 112], "boxes": [[0, 0, 56, 56], [0, 56, 56, 56]]}'
    with engine.begin() as connection:
        connection.execute(insert, {"id": "after", "sha": "1" * 64})
        connection.execute(
            text("update samples set image_layout = :layout where id = 'after'"),
            {"layout": layout},
        )
    with engine.connect() as connection:
        rows = connection.execute(text("select id, image_layout from samples order by id"))
        stored = {r[0]: r[1] for r in rows}
    assert stored["before"] is None
    after = stored["after"]  # PostgreSQL's driver parses a json column, SQLite's gives text
    assert (after if isinstance(after, dict) else json.loads(after))["canvas"] == [56, 112]
    downgrade(engine, "0007")
    assert "image_layout" not in _columns(engine, "samples")
    with engine.connect() as connection:
        ids = [r[0] for r in connection.execute(text("select id from samples order by id"))]
    assert ids == ["after", "before"]
