"""Migrations up to head and back down, on an empty SQLite database and a PostgreSQL schema;
revision 0007 adds the provenance of attributions and verdicts to existing rows."""

from __future__ import annotations

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
