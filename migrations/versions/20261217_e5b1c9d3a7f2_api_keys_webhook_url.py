"""Add api_keys.webhook_url: a key's default webhook endpoint.

Revision ID: e5b1c9d3a7f2
Revises: a3f8c2d61e90
Create Date: 2026-12-17 02:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e5b1c9d3a7f2"
down_revision: str | Sequence[str] | None = "a3f8c2d61e90"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the nullable column."""
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.add_column(sa.Column("webhook_url", sa.String(2048), nullable=True))


def downgrade() -> None:
    """Drop it."""
    with op.batch_alter_table("api_keys") as batch_op:
        batch_op.drop_column("webhook_url")
