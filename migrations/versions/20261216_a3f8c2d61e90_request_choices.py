"""Add requests.choices_json: every choice of an n > 1 or logprobs request.

Revision ID: a3f8c2d61e90
Revises: 7d2e9a4c1b63
Create Date: 2026-12-16 02:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a3f8c2d61e90"
down_revision: str | Sequence[str] | None = "7d2e9a4c1b63"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the column (null for the common one-choice result)."""
    with op.batch_alter_table("requests") as batch_op:
        batch_op.add_column(sa.Column("choices_json", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop the column."""
    with op.batch_alter_table("requests") as batch_op:
        batch_op.drop_column("choices_json")
