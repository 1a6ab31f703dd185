"""Add requests.crashes (poison isolation) and a partial index over queued suspects.

Revision ID: 5e1c0a7f3b21
Revises: 376574506a79
Create Date: 2026-12-02 05:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5e1c0a7f3b21"
down_revision: str | Sequence[str] | None = "376574506a79"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUSPECTS = sa.text("status = 'queued' AND crashes > 0")


def upgrade() -> None:
    """Count the engine crashes each request was present for; index the queued suspects."""
    with op.batch_alter_table("requests") as batch_op:
        batch_op.add_column(
            sa.Column("crashes", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
    op.create_index(
        "ix_requests_suspects",
        "requests",
        ["model", "crashes"],
        postgresql_where=SUSPECTS,
        sqlite_where=SUSPECTS,
    )


def downgrade() -> None:
    """Drop the column and its index."""
    op.drop_index("ix_requests_suspects", table_name="requests")
    with op.batch_alter_table("requests") as batch_op:
        batch_op.drop_column("crashes")
