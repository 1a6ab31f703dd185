"""Owners over real HTTP: another owner's key cannot see, count, cancel, delete or build on
what a key's owner made; per-key limits on queued requests and stored bytes answer 429."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from sluice.store.keys import create_key
from tests.api.helpers import Api, batch_line, error_of, jsonl


def _client(api: Api, owner: str, **limits: int) -> httpx.Client:
    key, _ = create_key(api.db, owner=owner, name=owner, **limits)
    return httpx.Client(base_url=api.url, timeout=30, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture(scope="module")
def team_b(api: Api) -> Iterator[httpx.Client]:
    """Another team's client."""
    with _client(api, "team-b") as http:
        yield http


def _upload(http: httpx.Client, content: bytes) -> httpx.Response:
    return http.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})


def _batch(http: httpx.Client, file_id: str) -> httpx.Response:
    return http.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    )


def test_another_owner_sees_nothing_in_lists(api: Api, team_b: httpx.Client) -> None:
    mine = api.upload(jsonl([batch_line("a", api.model)])).json()["id"]
    batch = _batch(api.http, mine).json()["id"]
    theirs = _upload(team_b, jsonl([batch_line("b", api.model)])).json()["id"]
    their_batch = _batch(team_b, theirs).json()["id"]

    b_files = [f["id"] for f in team_b.get("/v1/files").json()["data"]]
    b_batches = [b["id"] for b in team_b.get("/v1/batches").json()["data"]]
    assert theirs in b_files and mine not in b_files
    assert their_batch in b_batches and batch not in b_batches
    a_files = [f["id"] for f in api.http.get("/v1/files").json()["data"]]
    assert mine in a_files and theirs not in a_files
    # A cursor naming another owner's id is no way in either.
    after = team_b.get("/v1/batches", params={"after": batch})
    assert after.status_code == 400 and error_of(after)["param"] == "after"


def test_another_owner_cannot_delete_cancel_or_build_on_it(api: Api, team_b: httpx.Client) -> None:
    mine = api.upload(jsonl([batch_line(f"x{i}", api.model) for i in range(3)])).json()["id"]
    batch = _batch(api.http, mine).json()
    assert batch["status"] == "in_progress"

    assert team_b.delete(f"/v1/files/{mine}").status_code == 404
    assert team_b.post(f"/v1/batches/{batch['id']}/cancel").status_code == 404
    stolen = _batch(team_b, mine)
    assert stolen.status_code == 404 and error_of(stolen)["param"] == "input_file_id"
    # Nothing happened to them.
    assert api.http.get(f"/v1/files/{mine}").status_code == 200
    assert api.http.get(f"/v1/batches/{batch['id']}").json()["status"] == "in_progress"


def test_an_admin_key_may_cancel_any_owners_batch(api: Api, team_b: httpx.Client) -> None:
    theirs = _upload(team_b, jsonl([batch_line("c", api.model)])).json()["id"]
    batch = _batch(team_b, theirs).json()["id"]
    with _client(api, "ops") as admin_plain:
        # Not an admin key: 404 like any other owner.
        assert admin_plain.post(f"/v1/batches/{batch}/cancel").status_code == 404
    key, _ = create_key(api.db, owner="ops", name="ops-admin", admin=True)
    cancelled = httpx.post(
        f"{api.url}/v1/batches/{batch}/cancel", headers={"Authorization": f"Bearer {key}"}
    )
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.headers["sluice-admin"] == "all-owners"
    assert team_b.get(f"/v1/batches/{batch}").json()["status"] in ("cancelling", "cancelled")


def test_queued_limit_refuses_jobs_and_batches_with_429(api: Api) -> None:
    with _client(api, "small-q", queued_limit=3) as http:
        for i in range(3):
            assert http.post("/v1/jobs", json={"prompt": f"p{i}"}).status_code == 202
        refused = http.post("/v1/jobs", json={"prompt": "one more"})
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queued_limit_exceeded"
        # A batch of 2 lines over the same limit is refused before it is created.
        file_id = _upload(http, jsonl([batch_line("q1", api.model), batch_line("q2", api.model)]))
        assert file_id.status_code == 200
        before = len(http.get("/v1/batches").json()["data"])
        over = _batch(http, file_id.json()["id"])
        assert over.status_code == 429 and over.json()["error"]["code"] == "queued_limit_exceeded"
        assert len(http.get("/v1/batches").json()["data"]) == before
        # Online requests count too (they are jobs): refused before they are queued.
        online = http.post(
            "/v1/chat/completions",
            json={"model": api.model, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert online.status_code == 429, online.text
        assert online.json()["error"]["code"] == "queued_limit_exceeded"
    # Another owner is not limited by it.
    assert api.http.post("/v1/jobs", json={"prompt": "free"}).status_code == 202


def test_stored_bytes_limit_refuses_uploads_with_429(api: Api) -> None:
    content = jsonl([batch_line(f"s{i}", api.model) for i in range(5)])
    # Room for one file and its multipart framing (the declared size counts; ~300 bytes).
    with _client(api, "small-disk", bytes_limit=len(content) + 1000) as http:
        first = _upload(http, content)
        assert first.status_code == 200, first.text
        refused = _upload(http, content)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "storage_limit_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        # Deleting a file frees its bytes.
        assert http.delete(f"/v1/files/{first.json()['id']}").status_code == 200
        assert _upload(http, content).status_code == 200
