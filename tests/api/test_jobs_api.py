"""Single jobs over real HTTP: submit, validation errors, queue messages, long-poll, cancel."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from sluice.queue import done_channel
from sluice.store.work import Result, claim, write_results
from tests.api.helpers import Api, error_of

CHAT = {"messages": [{"role": "user", "content": "hello there"}]}


def submit(api: Api, **body: Any) -> dict[str, Any]:
    response = api.http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return dict(response.json())


def test_submit_chat_job_is_queued_with_location_and_message(api: Api) -> None:
    before = api.queued_ids(interactive=True)
    response = api.http.post("/v1/jobs", json={**CHAT, "max_tokens": 8, "temperature": 0})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["id"].startswith("job_")
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["object"] == "job"
    assert job["status"] == "queued"
    assert job["model"] == api.model
    assert job["endpoint"] == "/v1/chat/completions"
    assert job["output"] is None and job["error"] is None and job["usage"] is None
    assert isinstance(job["created_at"], int)
    assert job["timings"]["queued_at"] is not None and job["timings"]["started_at"] is None

    again = api.http.get(response.headers["location"])
    assert again.status_code == 200
    assert again.json()["id"] == job["id"]

    # One interactive message naming exactly this job's one request.
    after = api.queued_ids(interactive=True)
    assert len(after) == len(before) + 1
    (new,) = after[len(before) :]
    assert len(new) == 1
    claimed = claim(api.db, new, "test-worker", 60)
    assert [c.batch_id for c in claimed] == [job["id"]]
    assert '"max_tokens": 8' in claimed[0].body


def test_prompt_job_uses_completions_and_default_max_tokens(api: Api) -> None:
    before = api.queued_ids(interactive=True)
    job = submit(api, prompt="one two three")
    assert job["endpoint"] == "/v1/completions"
    (new,) = api.queued_ids(interactive=True)[len(before) :]
    (claimed,) = claim(api.db, new, "test-worker", 60)
    assert '"max_tokens": 256' in claimed.body
    assert f'"model": "{api.model}"' in claimed.body


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": "a", **CHAT}, "prompt", "invalid_value"),
        ({"max_tokens": 5}, "messages", "missing_required_parameter"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "invalid_value"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content", "invalid_value"),
        ({"messages": []}, "messages", "invalid_value"),
        ({**CHAT, "temperature": 5}, "temperature", "invalid_value"),
        ({**CHAT, "top_p": "high"}, "top_p", "invalid_value"),
        ({**CHAT, "max_tokens": "5"}, "max_tokens", "invalid_value"),
        ({**CHAT, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({**CHAT, "seed": 1.5}, "seed", "invalid_value"),
        ({**CHAT, "temprature": 1}, "temprature", "unknown_parameter"),
        ({"prompt": 42}, "prompt", "invalid_value"),
    ],
)
def test_invalid_job_names_the_field(api: Api, body: dict[str, Any], param: str, code: str) -> None:
    before = api.queue_length(interactive=True)
    response = api.http.post("/v1/jobs", json=body)
    assert response.status_code == 400, response.text
    err = error_of(response)
    assert err["param"] == param
    assert err["code"] == code
    assert param.split(".")[0] in err["message"]
    assert api.queue_length(interactive=True) == before


def test_unknown_model_is_404_model_not_found(api: Api) -> None:
    response = api.http.post("/v1/jobs", json={**CHAT, "model": "gpt-9"})
    assert response.status_code == 404
    err = error_of(response)
    assert (err["code"], err["param"]) == ("model_not_found", "model")
    assert "gpt-9" in err["message"]


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"messages": [', {"content-type": "application/json"}),
        (b"\xff\xfe{}", {"content-type": "application/json"}),
        (b"[1, 2]", {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
    ],
)
def test_malformed_body_is_400_not_500(api: Api, content: bytes, headers: dict[str, str]) -> None:
    response = api.http.post("/v1/jobs", content=content, headers=headers)
    assert response.status_code == 400, response.text
    error_of(response)


def test_unknown_job_is_404(api: Api) -> None:
    response = api.http.get("/v1/jobs/job_doesnotexist")
    assert response.status_code == 404
    assert error_of(response)["code"] == "job_not_found"


@pytest.mark.parametrize("wait", ["-1", "31", "abc", "nan"])
def test_wait_out_of_range_names_wait(api: Api, wait: str) -> None:
    job = submit(api, **CHAT)
    response = api.http.get(f"/v1/jobs/{job['id']}", params={"wait": wait})
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == "wait"


def test_wait_times_out_on_an_unfinished_job(api: Api) -> None:
    job = submit(api, **CHAT)
    started = time.monotonic()
    response = api.http.get(f"/v1/jobs/{job['id']}", params={"wait": 0.5})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json()["status"] == "queued"
    assert 0.45 <= elapsed < 5


def _finish_when_subscribed(api: Api, job_id: str, request_ids: list[int]) -> None:
    # Act as the worker once the long-poll is waiting: claim, write, announce.
    deadline = time.monotonic() + 10
    channel = done_channel(job_id)
    with httpx.Client(base_url=api.url) as http:
        while http.get("/readyz").json()["long_polls"] < 1:
            assert time.monotonic() < deadline, "the long-poll never started waiting"
            time.sleep(0.01)
    claimed = claim(api.db, request_ids, "test-worker", 60)
    assert len(claimed) == 1
    write_results(
        api.db,
        "test-worker",
        [
            Result(
                id=claimed[0].id,
                status="succeeded",
                output_text="general kenobi",
                finish_reason="stop",
                prompt_tokens=2,
                completion_tokens=2,
                finished_at=time.time(),
            )
        ],
    )
    api.redis.publish(channel, job_id)


def test_wait_returns_as_soon_as_the_job_finishes(api: Api) -> None:
    before = api.queued_ids(interactive=True)
    job = submit(api, **CHAT)
    (ids,) = api.queued_ids(interactive=True)[len(before) :]
    finisher = threading.Thread(target=_finish_when_subscribed, args=(api, job["id"], ids))
    finisher.start()
    started = time.monotonic()
    response = api.http.get(f"/v1/jobs/{job['id']}", params={"wait": 25})
    elapsed = time.monotonic() - started
    finisher.join()
    assert response.status_code == 200
    done = response.json()
    assert elapsed < 10
    assert done["status"] == "succeeded"
    assert done["output"] == "general kenobi"
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 0},
    }  # fmt: skip
    timings = done["timings"]
    assert timings["queued_at"] <= timings["started_at"] <= timings["finished_at"]
    assert timings["run_seconds"] is not None and timings["queue_seconds"] is not None

    # A finished job answers a long-poll at once.
    started = time.monotonic()
    response = api.http.get(f"/v1/jobs/{job['id']}", params={"wait": 25})
    assert time.monotonic() - started < 5
    assert response.json()["status"] == "succeeded"


def test_cancel_queued_job(api: Api) -> None:
    before = api.queued_ids(interactive=True)
    job = submit(api, **CHAT)
    (ids,) = api.queued_ids(interactive=True)[len(before) :]
    response = api.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["error"]["code"] == "batch_cancelled"
    # Its request never runs: a worker holding the message finds nothing to claim.
    assert claim(api.db, ids, "test-worker", 60) == []
    # Cancelling again is harmless.
    assert api.http.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    # A finished job gives an immediate answer to a long-poll.
    response = api.http.get(f"/v1/jobs/{job['id']}", params={"wait": 20})
    assert response.json()["status"] == "cancelled"


def test_cancel_finished_job_is_409(api: Api) -> None:
    before = api.queued_ids(interactive=True)
    job = submit(api, prompt="x")
    (ids,) = api.queued_ids(interactive=True)[len(before) :]
    (claimed,) = claim(api.db, ids, "test-worker", 60)
    write_results(
        api.db,
        "test-worker",
        [
            Result(
                id=claimed.id,
                status="failed",
                error_code="context_length_exceeded",
                error_message="too long",
                finished_at=time.time(),
            )
        ],
    )
    failed = api.http.get(f"/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "context_length_exceeded", "message": "too long"}
    response = api.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 409
    assert error_of(response)["code"] == "conflict"


def test_jobs_are_not_batches(api: Api) -> None:
    job = submit(api, **CHAT)
    assert api.http.get(f"/v1/batches/{job['id']}").status_code == 404
    listed = api.http.get("/v1/batches", params={"limit": 100}).json()["data"]
    assert job["id"] not in {b["id"] for b in listed}
