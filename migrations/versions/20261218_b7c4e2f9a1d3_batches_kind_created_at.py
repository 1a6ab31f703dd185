"""Index batches on (kind, created_at): the newest batches without a scan of every job.

Revision ID: b7c4e2f9a1d3
Revises: e5b1c9d3a7f2
Create Date: 2026-12-18 02:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "b7c4e2f9a1d3"
down_revision: str | Sequence[str] | None = "e5b1c9d3a7f2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the index."""
    op.create_index("ix_batches_kind_created_at", "batches", ["kind", "created_at"])


def downgrade() -> None:
    """Drop it."""
    op.drop_index("ix_batches_kind_created_at", table_name="batches")
