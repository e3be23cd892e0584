"""provenance of attributions and verdicts: search version, objective weights, detector and
its version, calibration (thresholds) id, scorer name

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    with op.batch_alter_table("attributions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("search_version", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("weight_insight", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("weight_necessity", sa.Float(), nullable=True))
    with op.batch_alter_table("verdicts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("detector", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("detector_version", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("thresholds_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("scorer_name", sa.String(length=256), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_verdicts_thresholds_id"), ["thresholds_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("verdicts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_verdicts_thresholds_id"))
        batch_op.drop_column("scorer_name")
        batch_op.drop_column("thresholds_id")
        batch_op.drop_column("detector_version")
        batch_op.drop_column("detector")
    with op.batch_alter_table("attributions", schema=None) as batch_op:
        batch_op.drop_column("weight_necessity")
        batch_op.drop_column("weight_insight")
        batch_op.drop_column("search_version")
