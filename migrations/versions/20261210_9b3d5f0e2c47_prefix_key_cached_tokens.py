"""Add file_lines.prefix_key (prefix-aware order) and cached prompt token counts.

Revision ID: 9b3d5f0e2c47
Revises: 5e1c0a7f3b21
Create Date: 2026-12-10 05:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9b3d5f0e2c47"
down_revision: str | Sequence[str] | None = "5e1c0a7f3b21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the sort key of input lines and the cached token counts of requests and batches."""
    with op.batch_alter_table("file_lines") as batch_op:
        batch_op.add_column(sa.Column("prefix_key", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("requests") as batch_op:
        batch_op.add_column(
            sa.Column("cached_tokens", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(
            sa.Column("cached_tokens", sa.BigInteger(), nullable=False, server_default=sa.text("0"))
        )


def downgrade() -> None:
    """Drop the three columns."""
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_column("cached_tokens")
    with op.batch_alter_table("requests") as batch_op:
        batch_op.drop_column("cached_tokens")
    with op.batch_alter_table("file_lines") as batch_op:
        batch_op.drop_column("prefix_key")
