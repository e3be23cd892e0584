"""sample correlation keys: upstream response id, W3C traceparent, choice index

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.add_column(sa.Column("response_id", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("traceparent", sa.String(length=55), nullable=True))
        batch_op.add_column(sa.Column("choice_index", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_samples_response_id"), ["response_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_samples_traceparent"), ["traceparent"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_samples_traceparent"))
        batch_op.drop_index(batch_op.f("ix_samples_response_id"))
        batch_op.drop_column("choice_index")
        batch_op.drop_column("traceparent")
        batch_op.drop_column("response_id")
