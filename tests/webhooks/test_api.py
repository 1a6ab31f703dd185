"""webhook_url on submit (jobs and batches), events for every end, the delivery log routes,
and another owner's 404 on them: the real API over HTTP, a real sender, real receivers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from standardwebhooks import Webhook

from sluice.ids import now
from sluice.models import batches, requests
from sluice.store import work
from sluice.webhooks.sender import Sender
from tests.api.helpers import Api, batch_line, error_of, jsonl
from tests.webhooks.receivers import Receiver, receiver
from tests.webhooks.test_delivery import SECRET

# Any credential header: state changes without one are refused (no ambient-credential CSRF).
H = {"Authorization": "Bearer local"}
HOOKS: dict[str, Any] = {
    "webhook_secret": SECRET,
    "webhook_allowlist": "127.0.0.0/8",
    "webhook_backoff_base": 0.05,
    "webhook_backoff_max": 0.2,
    "webhook_poll": 0.02,
    "webhook_timeout": 2.0,
    "webhook_retry_for": 30.0,
}
StartApi = Callable[..., AbstractContextManager[Api]]


@pytest.fixture(scope="module")
def api(start_api: StartApi) -> Iterator[Api]:
    with start_api(auth="off", **HOOKS) as running:
        sender = Sender(running.settings, running.db, owner="api-test")
        sender.start()
        try:
            yield running
        finally:
            sender.stop()


@pytest.fixture
def rec() -> Iterator[Receiver]:
    with receiver() as r:
        yield r


def run_job(api: Api, job_id: str) -> None:
    """Finish a job as a worker would (claim, write the result), without an engine."""
    with api.db.read() as conn:
        mine = select(requests.c.id).where(requests.c.batch_id == job_id)
        ids = list(conn.execute(mine).scalars())
    [claimed] = work.claim(api.db, ids, "w", 60)
    done = work.Result(claimed.id, "succeeded", "echoed", "stop", finished_at=now())
    assert work.write_results(api.db, "w", [done]) == [job_id]


def deliveries(api: Api, path: str, n: int = 1, status: str = "succeeded") -> list[Any]:
    """Poll the delivery log until n deliveries reached `status` (a deadline)."""
    deadline = time.monotonic() + 20
    while True:
        r = api.http.get(path, headers=H)
        assert r.status_code == 200, r.text
        data: list[Any] = r.json()["data"]
        if len(data) >= n and all(d["status"] == status for d in data):
            return data
        assert time.monotonic() < deadline, data
        time.sleep(0.05)


def submit_job(api: Api, **extra: Any) -> Any:
    body = {"model": api.model, "prompt": "hello", "max_tokens": 4, **extra}
    return api.http.post("/v1/jobs", json=body, headers=H)


def create_batch(api: Api, lines: list[dict[str, Any]], **extra: Any) -> Any:
    f = api.http.post(
        "/v1/files", files={"file": ("in.jsonl", jsonl(lines))}, data={"purpose": "batch"},
        headers=H,
    )  # fmt: skip
    assert f.status_code == 200, f.text
    body = {"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions", **extra}
    return api.http.post("/v1/batches", json=body, headers=H)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/hook",
        "http://[::ffff:192.168.0.1]/hook",
        "http://user:pw@example.com/hook",
        "not a url",
        "http://ex ample.com/hook",
        "http://example.com:99999/hook",
        "http://[fe80::1%25eth0]/hook",
        "https://example.com/" + "x" * 3000,
    ],
)
def test_bad_webhook_urls_are_refused_naming_the_field(api: Api, url: str) -> None:
    for r in (submit_job(api, webhook_url=url), create_batch(api, [], webhook_url=url)):
        assert r.status_code == 400, r.text
        assert "webhook_url" in (error_of(r)["param"] or ""), r.text


def test_without_a_secret_webhooks_are_refused(start_api: StartApi) -> None:
    with start_api(auth="off") as plain:
        r = submit_job(plain, webhook_url="https://hooks.example.com/x")
    assert r.status_code == 400
    assert error_of(r)["code"] == "webhooks_disabled"


def test_job_completed_reaches_the_receiver_and_the_log(api: Api, rec: Receiver) -> None:
    r = submit_job(api, webhook_url=rec.url)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    run_job(api, job_id)
    [call] = rec.wait_calls(1)
    event = Webhook(SECRET).verify(call.body, call.headers)
    assert event["type"] == "job.completed" and event["data"]["id"] == job_id
    assert event["data"]["job"]["output"] == "echoed"
    [d] = deliveries(api, f"/v1/jobs/{job_id}/deliveries")
    assert d["id"] == event["id"] == call.headers["webhook-id"]
    assert d["type"] == "job.completed" and d["url"] == rec.url
    assert [a["status_code"] for a in d["attempt_log"]] == [200]
    assert api.http.get(f"/v1/batches/{job_id}/deliveries", headers=H).status_code == 404
    assert api.http.get("/v1/jobs/job_nope/deliveries", headers=H).status_code == 404


def test_batch_failed_cancelled_and_expired_events(api: Api, rec: Receiver) -> None:
    bad = create_batch(api, [batch_line("a", "no-such-model")], webhook_url=rec.url).json()
    assert bad["status"] == "failed"
    good = [batch_line(str(i), api.model) for i in range(3)]
    cancelled = create_batch(api, good, webhook_url=rec.url).json()
    assert api.http.post(f"/v1/batches/{cancelled['id']}/cancel", headers=H).status_code == 200
    expired = create_batch(api, good, webhook_url=rec.url).json()
    with api.db.write() as conn:
        conn.execute(update(batches).where(batches.c.id == expired["id"]).values(expires_at=0))
    assert expired["id"] in work.expire_batches(api.db)
    calls = rec.wait_calls(3)
    types = {}
    for call in calls:
        event = Webhook(SECRET).verify(call.body, call.headers)
        assert set(event) == {"id", "object", "type", "created_at", "data"}
        types[event["data"]["id"]] = event["type"]
    assert types == {
        bad["id"]: "batch.failed",
        cancelled["id"]: "batch.cancelled",
        expired["id"]: "batch.expired",
    }
    for b in (bad, cancelled, expired):
        [d] = deliveries(api, f"/v1/batches/{b['id']}/deliveries")
        assert d["type"] == types[b["id"]]
    # A batch without webhook_url has no deliveries (and says so with an empty list).
    quiet = create_batch(api, [batch_line("q", "no-such-model")]).json()
    assert api.http.get(f"/v1/batches/{quiet['id']}/deliveries", headers=H).json()["data"] == []


def test_another_owner_gets_404_on_a_delivery_log(start_api: StartApi, rec: Receiver) -> None:
    from sluice.store.keys import create_key

    with start_api(auth="on", **HOOKS) as keyed:
        mine, _ = create_key(keyed.db, owner="team-a")
        theirs, _ = create_key(keyed.db, owner="team-b")
        body = {"model": keyed.model, "prompt": "hi", "max_tokens": 2, "webhook_url": rec.url}
        r = keyed.http.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {mine}"})
        assert r.status_code == 202, r.text
        path = f"/v1/jobs/{r.json()['id']}/deliveries"
        assert keyed.http.get(path, headers={"Authorization": f"Bearer {mine}"}).status_code == 200
        other = keyed.http.get(path, headers={"Authorization": f"Bearer {theirs}"})
        assert other.status_code == 404, other.text
        # The fixture's client holds a key of owner "default": another owner too.
        assert keyed.http.get(path).status_code == 404
        assert httpx.get(f"{keyed.url}{path}").status_code == 401
        admin, _ = create_key(keyed.db, owner="ops", admin=True)
        seen = keyed.http.get(path, headers={"Authorization": f"Bearer {admin}"})
        assert seen.status_code == 200, seen.text


def test_a_keys_default_endpoint_gets_its_events(start_api: StartApi, rec: Receiver) -> None:
    from sluice.store.keys import create_key

    with receiver() as other, start_api(auth="on", **HOOKS) as keyed:
        sender = Sender(keyed.settings, keyed.db, owner="key-default")
        sender.start()
        try:
            key, _ = create_key(keyed.db, owner="team-c", webhook_url=rec.url)
            auth = {"Authorization": f"Bearer {key}"}
            body = {"model": keyed.model, "prompt": "hi", "max_tokens": 2}
            plain = keyed.http.post("/v1/jobs", json=body, headers=auth).json()["id"]
            own = {**body, "webhook_url": other.url}
            named = keyed.http.post("/v1/jobs", json=own, headers=auth).json()["id"]
            for job_id in (plain, named):
                run_job(keyed, job_id)
            [to_default] = rec.wait_calls(1)
            [to_named] = other.wait_calls(1)
        finally:
            sender.stop()
    assert json.loads(to_default.body)["data"]["id"] == plain
    assert json.loads(to_named.body)["data"]["id"] == named
