"""GET /v1/admin/status: the queue, the workers, throughput and recent batches (`sluice status`)."""

from __future__ import annotations

import time

import anyio
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.deps import AdminDep, StateDep
from api.docs import ADMIN_ERRORS
from api.workers import WorkerView, read_workers
from sluice.metrics import PRIORITY_LABELS
from sluice.store.stats import BatchLine, queue_counts, recent_batches

router = APIRouter(prefix="/v1/admin")


class QueueLine(BaseModel):
    """Requests of one model and priority that wait or run."""

    model: str
    priority: str = Field(description="interactive or bulk")
    queued: int
    running: int


class BatchOut(BaseModel):
    """A batch as the status lists it."""

    id: str
    model: str
    status: str
    total: int
    completed: int
    failed: int
    output_tokens: int
    created_at: int


class Throughput(BaseModel):
    """What the live workers wrote and generated per second (last 10 s)."""

    requests_per_second: float
    tokens_per_second: float


class StatusOut(BaseModel):
    """The deployment now."""

    object: str = "sluice.status"
    generated_at: float
    models: list[str] = Field(description="The models the API accepts.")
    queue: list[QueueLine]
    workers: list[WorkerView]
    throughput: Throughput
    batches: list[BatchOut]


def _batch(b: BatchLine) -> BatchOut:
    return BatchOut(**b.__dict__)


@router.get("/status", response_model=StatusOut, responses=ADMIN_ERRORS)
async def status(
    state: StateDep,
    _admin: AdminDep,
    batches: int = Query(10, ge=0, le=100, description="How many recent batches to list."),
) -> StatusOut:
    """Queue depth, workers (model, engine, occupancy, last seen), throughput, batches."""
    models = state.settings.accepted_models
    counts = await anyio.to_thread.run_sync(queue_counts, state.db, models)
    recent = await anyio.to_thread.run_sync(recent_batches, state.db, batches) if batches else []
    workers = await read_workers(state.redis, state.settings.worker_stale_seconds)
    lines: dict[tuple[str, int], QueueLine] = {
        (m, p): QueueLine(model=m, priority=name, queued=0, running=0)
        for m in models
        for p, name in PRIORITY_LABELS.items()
    }
    for c in counts:
        line = lines.setdefault(
            (c.model, c.priority),
            QueueLine(model=c.model, priority=str(c.priority), queued=0, running=0),
        )
        if c.status == "queued":
            line.queued += c.count
        else:
            line.running += c.count
    live = [w for w in workers if w.live]
    return StatusOut(
        generated_at=time.time(),
        models=models,
        queue=list(lines.values()),
        workers=workers,
        throughput=Throughput(
            requests_per_second=round(sum(w.requests_per_second for w in live), 3),
            tokens_per_second=round(sum(w.tokens_per_second for w in live), 3),
        ),
        batches=[_batch(b) for b in recent],
    )
