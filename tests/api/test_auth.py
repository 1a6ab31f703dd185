"""API keys over real HTTP: every route in the OpenAPI schema refuses a missing, wrong, revoked
or expired key, and another owner's key finds nothing; keys are stored as hashes; rpm limit."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from sluice.models import api_keys
from sluice.store.keys import create_key, hash_key, revoke_key
from tests.api.helpers import Api, batch_line, error_of, jsonl

# Paths that answer without a key (api/auth.py PUBLIC_PATHS, as they appear in the schema).
PUBLIC = {"/healthz", "/readyz"}
# Models are not owned: another owner's key reads them like anyone's.
UNOWNED = {"/v1/models", "/v1/models/{model_id}"}
# Admin-only routes: a key without --admin gets 403.
ADMIN = re.compile(r"^/v1/admin/")


def _operations(api: Api) -> list[tuple[str, str]]:
    """(method, path) of every operation the schema lists."""
    schema = api.http.get("/openapi.json").json()
    ops = [
        (method.upper(), path)
        for path, item in schema["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    ]
    assert len(ops) >= 12, ops
    return ops


def _fill(path: str, ids: dict[str, str]) -> str:
    """The path with each {param} replaced by the id of that kind (a new param fails here)."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1).split(":")[0]
        assert name in ids, f"path parameter {name!r} of {path}: teach this test what it names"
        return ids[name]

    return re.sub(r"\{([^}]+)\}", one, path)


@pytest.fixture(scope="module")
def owned(api: Api) -> dict[str, str]:
    """A file, a batch and a job of the default owner (the api fixture's key)."""
    upload = api.upload(jsonl([batch_line("a1", api.model)]))
    assert upload.status_code == 200, upload.text
    file_id = upload.json()["id"]
    batch = api.http.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    )
    assert batch.status_code == 200, batch.text
    job = api.http.post("/v1/jobs", json={"prompt": "hello"})
    assert job.status_code == 202, job.text
    return {
        "file_id": file_id,
        "batch_id": batch.json()["id"],
        "job_id": job.json()["id"],
        "model_id": api.model,
    }


@pytest.fixture(scope="module")
def revoked_key(api: Api) -> str:
    """A key of the same owner, revoked."""
    key, info = create_key(api.db, owner="default", name="revoked")
    revoke_key(api.db, info.id)
    return key


@pytest.fixture(scope="module")
def expired_key(api: Api) -> str:
    """A key of the same owner whose expiry has passed."""
    key, _ = create_key(api.db, owner="default", name="expired", expires_at=int(time.time()) - 1)
    return key


@pytest.fixture(scope="module")
def other(api: Api) -> Iterator[httpx.Client]:
    """A client with a live key of another owner."""
    key, _ = create_key(api.db, owner="team-b", name="b")
    with httpx.Client(
        base_url=api.url, timeout=30, headers={"Authorization": f"Bearer {key}"}
    ) as http:
        yield http


def _call(api: Api, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.request(method, f"{api.url}{path}", headers=headers, timeout=30)


def test_public_routes_are_only_the_probes(api: Api, owned: dict[str, str]) -> None:
    public = {
        path
        for method, path in _operations(api)
        if _call(api, method, _fill(path, owned), {}).status_code != 401
    }
    assert public == PUBLIC


@pytest.mark.parametrize("credential", ["none", "wrong", "revoked", "expired", "malformed"])
def test_every_route_refuses_a_bad_key_with_401(
    api: Api, owned: dict[str, str], revoked_key: str, expired_key: str, credential: str
) -> None:
    headers = {
        "none": {},
        "wrong": {"Authorization": "Bearer sk-sluice-" + "x" * 43},
        "revoked": {"Authorization": f"Bearer {revoked_key}"},
        "expired": {"Authorization": f"Bearer {expired_key}"},
        "malformed": {"Authorization": "Basic dXNlcjpwYXNz"},
    }[credential]
    checked = []
    for method, path in _operations(api):
        if path in PUBLIC:
            continue
        response = _call(api, method, _fill(path, owned), headers)
        assert response.status_code == 401, (method, path, response.text)
        assert error_of(response)["code"] in ("missing_api_key", "invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
        checked.append(path)
    assert len(checked) >= 10


def test_every_owned_route_is_404_for_another_owner(
    api: Api, owned: dict[str, str], other: httpx.Client
) -> None:
    """Read, cancel, delete, download, results: another owner's key finds nothing."""
    seen = 0
    for method, path in _operations(api):
        if path in PUBLIC or path in UNOWNED:
            continue
        response = other.request(method, _fill(path, owned))
        if ADMIN.match(path):
            assert response.status_code == 403, (method, path, response.text)
        elif "{" in path:
            assert response.status_code == 404, (method, path, response.text)
            seen += 1
        else:
            # Lists and creations: never a trace of the other owner's ids.
            for ident in (owned["file_id"], owned["batch_id"], owned["job_id"]):
                assert ident not in response.text, (method, path, response.text)
    assert seen >= 8
    # The owner itself still has them all.
    assert api.http.get(f"/v1/files/{owned['file_id']}").status_code == 200
    assert api.http.get(f"/v1/batches/{owned['batch_id']}").status_code == 200
    assert api.http.get(f"/v1/jobs/{owned['job_id']}").status_code == 200


def test_keys_are_stored_as_hashes_only(api: Api) -> None:
    key, info = create_key(api.db, owner="team-c", name="c")
    with api.db.read() as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.id == info.id)).mappings().one()
    assert key not in " ".join(str(v) for v in row.values())
    assert row["hash"] == hash_key(key)
    assert key.startswith(row["prefix"]) and len(row["prefix"]) < 16


def test_revoking_takes_effect_on_the_next_request(api: Api) -> None:
    key, info = create_key(api.db, owner="default", name="short-lived")
    headers = {"Authorization": f"Bearer {key}"}
    assert _call(api, "GET", "/v1/files", headers).status_code == 200
    revoke_key(api.db, info.id)
    assert _call(api, "GET", "/v1/files", headers).status_code == 401


def test_rpm_limit_answers_429_with_retry_after(api: Api) -> None:
    key, _ = create_key(api.db, owner="default", name="slow", rpm_limit=3)
    headers = {"Authorization": f"Bearer {key}"}
    # Inside one minute window: start right after a boundary so the 4 calls share it.
    if time.time() % 60 > 55:
        time.sleep(60 - time.time() % 60 + 0.1)
    codes = [_call(api, "GET", "/v1/batches", headers).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    refused = _call(api, "GET", "/v1/batches", headers)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    body: dict[str, Any] = refused.json()["error"]
    assert body["code"] == "rate_limit_exceeded"
    # Other keys are not slowed down by it.
    assert api.http.get("/v1/batches").status_code == 200


def test_an_unknown_owner_pattern_is_refused(api: Api) -> None:
    from sluice.errors import InvalidInput

    with pytest.raises(InvalidInput):
        create_key(api.db, owner="two words")


def test_admin_keys_see_every_owner_and_say_so(api: Api, owned: dict[str, str]) -> None:
    key, _ = create_key(api.db, owner="ops", name="admin", admin=True)
    headers = {"Authorization": f"Bearer {key}"}
    got = _call(api, "GET", f"/v1/batches/{owned['batch_id']}", headers)
    assert got.status_code == 200 and got.headers["sluice-admin"] == "all-owners"
    listed = _call(api, "GET", "/v1/files", headers)
    assert owned["file_id"] in listed.text
    # Ordinary keys' answers carry no such header.
    assert "sluice-admin" not in api.http.get(f"/v1/batches/{owned['batch_id']}").headers
    assert _call(api, "GET", "/v1/admin/status", headers).status_code == 200


def test_a_key_past_its_expiry_stops_working(api: Api) -> None:
    key, info = create_key(api.db, owner="default", name="soon")
    headers = {"Authorization": f"Bearer {key}"}
    assert _call(api, "GET", "/v1/files", headers).status_code == 200
    with api.db.write() as conn:
        conn.execute(
            update(api_keys).where(api_keys.c.id == info.id).values(expires_at=int(time.time()))
        )
    assert _call(api, "GET", "/v1/files", headers).status_code == 401
