"""/v1/admin/status and /metrics over real HTTP on each database backend, with no worker:
what is submitted stays queued, so every count is exact."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from prometheus_client.parser import text_string_to_metric_families

from sluice.store.keys import create_key
from tests.api.helpers import Api, batch_line, jsonl

JOBS, LINES = 3, 5


def _queue_some(api: Api) -> str:
    for i in range(JOBS):
        assert api.http.post("/v1/jobs", json={"prompt": f"job {i}"}).status_code == 202
    lines = [batch_line(f"l{i}", api.model) for i in range(LINES)]
    f = api.http.post(
        "/v1/files", files={"file": ("in.jsonl", jsonl(lines))}, data={"purpose": "batch"}
    )
    assert f.status_code == 200, f.text
    b = api.http.post(
        "/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions"}
    )
    assert b.status_code == 200, b.text
    return str(b.json()["id"])


def test_status_and_metrics_count_the_queue(api: Api) -> None:
    batch_id = _queue_some(api)
    admin, _ = create_key(api.db, owner="ops", name="status-test", admin=True)

    # Every owner's work: admin keys only.
    assert api.http.get("/v1/admin/status").status_code == 403
    response = api.http.get(
        "/v1/admin/status", headers={"Authorization": f"Bearer {admin}"}, params={"batches": 5}
    )
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["models"] == [api.model]
    queue = {q["priority"]: q for q in doc["queue"] if q["model"] == api.model}
    assert queue["interactive"]["queued"] == JOBS and queue["bulk"]["queued"] == LINES
    assert queue["interactive"]["running"] == queue["bulk"]["running"] == 0
    assert not [w for w in doc["workers"] if w["model"] == api.model]
    (listed,) = [b for b in doc["batches"] if b["id"] == batch_id]
    assert listed["status"] == "in_progress" and listed["total"] == LINES
    assert doc["throughput"] == {"requests_per_second": 0.0, "tokens_per_second": 0.0}
    bad = api.http.get(
        "/v1/admin/status", headers={"Authorization": f"Bearer {admin}"}, params={"batches": 101}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "batches"

    # /metrics is public, like the probes, and counts the same rows.
    metrics = api.http.get("/metrics", headers={"Authorization": ""})
    assert metrics.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.text)
        for s in family.samples
    }

    def sample(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert sample("sluice_queue_depth", model=api.model, priority="interactive") == JOBS
    assert sample("sluice_queue_depth", model=api.model, priority="bulk") == LINES
    assert sample("sluice_requests", model=api.model, priority="bulk", status="queued") == LINES
    assert sample("sluice_batches_active", status="in_progress") >= 1 + JOBS
    assert sample("sluice_workers", model=api.model, engine="") == 0
    assert sample("sluice_dependency_up", dependency="database") == 1
    assert sample("sluice_dependency_up", dependency="redis") == 1


def test_metrics_answer_with_redis_down(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    # A scrape never fails on a dependency: it says which one it could not reach.
    with start_api(redis_url="redis://127.0.0.1:1/0") as broken:
        response = broken.http.get("/metrics")
        assert response.status_code == 200, response.text
        up = {
            s.labels["dependency"]: s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
            if s.name == "sluice_dependency_up"
        }
        assert up == {"database": 1.0, "redis": 0.0}
        assert "sluice_queue_depth{" in response.text  # the database part still answers
