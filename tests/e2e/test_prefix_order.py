"""Prefix-aware order through the real stack: a shuffled documents x questions file runs
document by document, and its output file still follows the input file's lines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from sluice.models import requests
from tests.api.test_prefix_order import CHAT, DOCS, doc_of, docs_x_questions, runs
from tests.e2e.conftest import Running, start_stack

MODEL = "sluice-echo"
SLOTS = 4


@pytest.fixture(scope="module")
def sluice(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """Sim engine with 4 slots: requests run in small waves, in the order they were claimed."""
    yield from start_stack(
        backend,
        Path(tmp_path_factory.mktemp(f"prefix-{backend}")),
        SLUICE_ENGINE="sim",
        SLUICE_MAX_NUM_SEQS=str(SLOTS),
        SLUICE_SIM_DECODE_STEP="0.002",
        SLUICE_SIM_DECODE_PER_SEQ="0",
        SLUICE_SIM_PREFILL_PER_TOKEN="0",
    )


def finish_order(sluice: Running, batch_id: str) -> list[str]:
    """custom_ids in the order the worker finished them (ties: claim order)."""
    db = create_engine(sluice.settings.resolved_database_url)
    with db.connect() as conn:
        rows = conn.execute(
            select(requests.c.custom_id)
            .where(requests.c.batch_id == batch_id)
            .order_by(requests.c.finished_at, requests.c.id)
        ).all()
    db.dispose()
    return [r.custom_id for r in rows]


def test_shuffled_documents_run_grouped_and_output_follows_input(sluice: Running) -> None:
    lines = docs_x_questions(MODEL, CHAT)
    for x in lines:
        x["body"]["max_tokens"] = 4
    batch = sluice.run_file(lines, CHAT)
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": len(lines), "completed": len(lines), "failed": 0}
    # Each document's questions ran as one stretch.
    ran = [doc_of(c) for c in finish_order(sluice, batch["id"])]
    assert runs(ran) == DOCS, ran
    out = sluice.lines(batch["output_file_id"])
    assert [x["custom_id"] for x in out] == [x["custom_id"] for x in lines]
    usage = [x["response"]["body"]["usage"] for x in out]
    # The sim engine has no prefix cache: zero cached tokens, reported in OpenAI's shape.
    assert all(u["prompt_tokens_details"] == {"cached_tokens": 0} for u in usage)
    assert batch["usage"]["input_tokens"] == sum(u["prompt_tokens"] for u in usage) > 0
    assert batch["usage"]["input_tokens_details"] == {"cached_tokens": 0}
