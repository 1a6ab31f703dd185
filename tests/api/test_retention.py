"""Retention on a real database: files past expires_at are deleted by the reconciler's round,
output files live output_expires_after seconds, an input file in use waits."""

from __future__ import annotations

import time

from sqlalchemy import func, select, update

from sluice.models import file_lines, files, requests
from sluice.store.retention import delete_expired_files
from sluice.store.work import Result, claim, write_results
from tests.api.helpers import Api, batch_line, jsonl


def _expire(api: Api, file_id: str) -> None:
    with api.db.write() as conn:
        conn.execute(
            update(files).where(files.c.id == file_id).values(expires_at=int(time.time()) - 1)
        )


def _request_ids(api: Api, batch_id: str) -> list[int]:
    with api.db.read() as conn:
        return list(
            conn.execute(select(requests.c.id).where(requests.c.batch_id == batch_id)).scalars()
        )


def test_expired_uploads_are_deleted_unless_a_running_batch_reads_them(api: Api) -> None:
    idle = api.upload(jsonl([batch_line("a", api.model)])).json()["id"]
    used = api.upload(jsonl([batch_line("b", api.model)])).json()["id"]
    batch = api.http.post(
        "/v1/batches", json={"input_file_id": used, "endpoint": "/v1/chat/completions"}
    ).json()
    assert batch["status"] == "in_progress"
    fresh = api.upload(jsonl([batch_line("c", api.model)])).json()["id"]
    _expire(api, idle)
    _expire(api, used)

    deleted = delete_expired_files(api.db)

    assert idle in deleted and used not in deleted and fresh not in deleted
    assert api.http.get(f"/v1/files/{idle}").status_code == 404
    with api.db.read() as conn:
        lines = conn.execute(
            select(func.count()).select_from(file_lines).where(file_lines.c.file_id == idle)
        ).scalar()
    assert lines == 0
    assert api.http.get(f"/v1/files/{used}").status_code == 200
    assert api.http.get(f"/v1/files/{fresh}").status_code == 200


def test_output_files_live_output_expires_after_then_go_with_their_results(api: Api) -> None:
    file_id = api.upload(jsonl([batch_line(f"o{i}", api.model) for i in range(3)])).json()["id"]
    created = api.http.post(
        "/v1/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "output_expires_after": {"anchor": "created_at", "seconds": 7200},
        },
    )
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    ids = _request_ids(api, batch_id)
    claimed = claim(api.db, ids, "test-worker", 60)
    write_results(
        api.db,
        "test-worker",
        [
            Result(id=c.id, status="succeeded", output_text="ok", finish_reason="stop")
            for c in claimed
        ],
    )
    batch = api.http.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "completed"
    output = api.http.get(f"/v1/files/{batch['output_file_id']}").json()
    assert output["expires_at"] - output["created_at"] == 7200

    assert batch["output_file_id"] not in delete_expired_files(api.db)  # not yet
    _expire(api, batch["output_file_id"])
    assert delete_expired_files(api.db) == [batch["output_file_id"]]

    assert api.http.get(f"/v1/files/{batch['output_file_id']}").status_code == 404
    assert _request_ids(api, batch_id) == []  # the results it was rendered from are gone
    after = api.http.get(f"/v1/batches/{batch_id}").json()
    assert after["request_counts"]["completed"] == 3  # the batch keeps its counts


def test_output_expires_after_is_bounded_as_openai_bounds_it(api: Api) -> None:
    file_id = api.upload(jsonl([batch_line("x", api.model)])).json()["id"]
    for seconds in (60, 31 * 86400):
        response = api.http.post(
            "/v1/batches",
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "output_expires_after": {"anchor": "created_at", "seconds": seconds},
            },
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "output_expires_after.seconds"
