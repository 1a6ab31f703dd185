"""Retention: files past their expires_at are deleted, so a disk cannot fill forever."""

from __future__ import annotations

from sqlalchemy import delete, exists, select

from sluice.db import Database
from sluice.ids import unix
from sluice.models import TERMINAL_BATCH, batches, file_lines, files, requests

# Files deleted per round at most: one round stays a short transaction (the reconciler runs
# every few seconds, so a backlog of 10,000 expired files is gone in 20 rounds).
ROUND = 500


def delete_expired_files(db: Database, now: int | None = None, limit: int = ROUND) -> list[str]:
    """Delete up to `limit` expired files; returns their ids.

    An input file still read by an unfinished batch waits until that batch ends. When a
    finished batch has lost both its output and error files, its request rows (prompts and
    results, what those files were rendered from) go too; the batch keeps its counts.
    """
    now = unix() if now is None else now
    busy = exists().where(
        batches.c.input_file_id == files.c.id, batches.c.status.not_in(TERMINAL_BATCH)
    )
    with db.write() as conn:
        rows = conn.execute(
            select(files.c.id, files.c.batch_id)
            .where(files.c.expires_at.is_not(None), files.c.expires_at <= now, ~busy)
            .order_by(files.c.expires_at)
            .limit(limit)
        ).all()
        if not rows:
            return []
        ids = [r.id for r in rows]
        conn.execute(delete(file_lines).where(file_lines.c.file_id.in_(ids)))
        conn.execute(delete(files).where(files.c.id.in_(ids)))
        touched = sorted({r.batch_id for r in rows if r.batch_id})
        if touched:
            left = exists().where(files.c.batch_id == batches.c.id)
            gone = conn.execute(
                select(batches.c.id).where(
                    batches.c.id.in_(touched), batches.c.status.in_(TERMINAL_BATCH), ~left
                )
            ).scalars()
            done = list(gone)
            if done:
                conn.execute(delete(requests).where(requests.c.batch_id.in_(done)))
    return ids
