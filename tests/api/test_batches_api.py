"""Batches over real HTTP: create, validation by line, limits, list, cancel, results."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final

import openai
import pytest

from sluice.queue import CANCEL_CHANNEL
from sluice.store.work import Result, claim, write_results
from tests.api.helpers import Api, batch_line, error_of, jsonl

BATCH_FIELDS = {
    "id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window",
    "status", "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
    "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
    "cancelled_at", "request_counts", "usage", "metadata",
}  # fmt: skip
CHAT: Final = "/v1/chat/completions"


def upload(api: Api, lines: Sequence[dict[str, Any] | bytes]) -> str:
    response = api.upload(jsonl(lines))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def create(api: Api, file_id: str, endpoint: str = CHAT, **extra: Any) -> dict[str, Any]:
    response = api.http.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": endpoint, **extra}
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def lines_of(content: bytes) -> list[dict[str, Any]]:
    return [json.loads(x) for x in content.splitlines()]


def test_create_batch_queues_every_line_in_bulk_messages(api: Api) -> None:
    before = api.queued_ids()
    file_id = upload(api, [batch_line(f"req-{i}", api.model) for i in range(7)])
    batch = create(api, file_id, metadata={"project": "demo"})
    assert set(batch) == BATCH_FIELDS
    assert batch["object"] == "batch"
    assert batch["id"].startswith("batch_")
    assert batch["status"] == "in_progress"
    assert batch["endpoint"] == CHAT
    assert batch["model"] == api.model
    assert batch["input_file_id"] == file_id
    assert batch["completion_window"] == "24h"
    assert batch["errors"] is None
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    assert batch["request_counts"] == {"total": 7, "completed": 0, "failed": 0}
    assert batch["usage"] == {
        "input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }  # fmt: skip
    assert batch["metadata"] == {"project": "demo"}
    assert batch["expires_at"] == batch["created_at"] + 86400
    assert batch["in_progress_at"] == batch["created_at"]
    for name in (
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ):
        assert batch[name] is None

    # One bulk message naming the batch's 7 requests (chunk size 500).
    new = api.queued_ids()[len(before) :]
    assert len(new) == 1 and len(new[0]) == 7
    assert api.http.get(f"/v1/batches/{batch['id']}").json() == batch


def test_large_batch_is_split_into_chunk_sized_messages(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    with start_api(chunk_size=4) as small:
        before = small.queued_ids()
        file_id = upload(small, [batch_line(f"c{i}", small.model) for i in range(10)])
        create(small, file_id)
        new = small.queued_ids()[len(before) :]
        assert [len(ids) for ids in new] == [4, 4, 2]
        assert len({i for ids in new for i in ids}) == 10


def test_every_bad_line_is_reported_by_number(api: Api) -> None:
    m = api.model
    bad_role = {"model": m, "messages": [{"role": "wizard", "content": "x"}]}
    lines: list[dict[str, Any] | bytes] = [
        batch_line("ok-1", m),  # 1
        b'{"custom_id": "broken", ',  # 2
        b"",  # 3
        b'{"custom_id": "\xff\xfe"}',  # 4
        b"[1, 2, 3]",  # 5
        json.dumps(batch_line("long", m, body={"model": m, "prompt": "x" * 5000})).encode(),  # 6
        {"method": "POST", "url": CHAT, "body": {"model": m, "messages": []}},  # 7
        {"custom_id": "no-method", "url": CHAT, "body": {"model": m}},  # 8
        {"custom_id": "no-url", "method": "POST", "body": {"model": m}},  # 9
        {"custom_id": "no-body", "method": "POST", "url": CHAT},  # 10
        batch_line("embed", m, url="/v1/embeddings", body={"model": m, "input": "x"}),  # 11
        batch_line("other-model", "gpt-4o-mini"),  # 12
        batch_line("ok-1", m),  # 13
        batch_line("wrong-endpoint", m, url="/v1/completions"),  # 14
        batch_line("bad-role", m, body=bad_role),  # 15
        batch_line("ok-2", m),  # 16
    ]
    before = api.queue_length()
    batch = create(api, upload(api, lines))
    assert batch["status"] == "failed"
    assert batch["failed_at"] is not None and batch["in_progress_at"] is None
    assert batch["request_counts"]["total"] == 0
    errors = batch["errors"]
    assert errors["object"] == "list"
    by_line = {e["line"]: e for e in errors["data"] if e["line"] is not None}
    assert {line: e["code"] for line, e in by_line.items()} == {
        2: "invalid_json_line",
        3: "invalid_json_line",
        4: "invalid_json_line",
        5: "invalid_json_line",
        6: "line_too_long",
        7: "missing_required_parameter",
        8: "missing_required_parameter",
        9: "missing_required_parameter",
        10: "missing_required_parameter",
        11: "invalid_url",
        12: "model_not_found",
        13: "duplicate_custom_id",
        14: "invalid_url",
        15: "invalid_value",
    }
    assert by_line[7]["param"] == "custom_id"
    assert by_line[8]["param"] == "method"
    assert by_line[9]["param"] == "url"
    assert by_line[10]["param"] == "body"
    assert by_line[15]["param"] == "body.messages[0].role"
    assert "blank" in by_line[3]["message"]
    assert "UTF-8" in by_line[4]["message"]
    for line, err in by_line.items():
        assert f"line {line}" in err["message"]
    # Nothing of a failed batch is queued.
    assert api.queue_length() == before


def test_empty_file_fails_with_empty_file(api: Api) -> None:
    response = api.upload(b"")
    assert response.status_code == 200
    batch = create(api, response.json()["id"])
    assert batch["status"] == "failed"
    assert [e["code"] for e in batch["errors"]["data"]] == ["empty_file"]


def test_too_many_tasks_uses_the_configured_limit(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    with start_api(max_file_lines=3) as small:
        ok = create(small, upload(small, [batch_line(f"t{i}", small.model) for i in range(3)]))
        assert ok["status"] == "in_progress"
        over = create(small, upload(small, [batch_line(f"t{i}", small.model) for i in range(4)]))
        assert over["status"] == "failed"
        assert [e["code"] for e in over["errors"]["data"]] == ["too_many_tasks"]
        assert "3" in over["errors"]["data"][0]["message"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"endpoint": "/v1/embeddings"}, 400, "endpoint"),
        ({"endpoint": "/v1/moderations"}, 400, "endpoint"),
        ({"completion_window": "soon"}, 400, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, 400, "metadata"),
        ({"metadata": {"k": "v" * 513}}, 400, "metadata"),
        ({"metadata": {"k": 5}}, 400, "metadata.k"),
        ({"input_file_id": None}, 400, "input_file_id"),
        ({"input_file_id": "file-nope"}, 404, "input_file_id"),
    ],
)
def test_bad_create_request_names_the_field(
    api: Api, body: dict[str, Any], status: int, param: str
) -> None:
    file_id = upload(api, [batch_line("v", api.model)])
    payload = {"input_file_id": file_id, "endpoint": CHAT, **body}
    payload = {k: v for k, v in payload.items() if v is not None}
    response = api.http.post("/v1/batches", json=payload)
    assert response.status_code == status, response.text
    assert error_of(response)["param"] == param


def test_metadata_at_the_limits_is_accepted(api: Api) -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    batch = create(api, upload(api, [batch_line("m", api.model)]), metadata=metadata)
    assert batch["metadata"] == metadata


def test_completions_batch(api: Api) -> None:
    lines = [batch_line(f"p{i}", api.model, url="/v1/completions") for i in range(3)]
    batch = create(api, upload(api, lines), endpoint="/v1/completions")
    assert batch["status"] == "in_progress"
    assert batch["endpoint"] == "/v1/completions"


def test_list_batches_paginates_newest_first(api: Api) -> None:
    for i in range(3):
        create(api, upload(api, [batch_line(f"l{i}", api.model)]))
    full = api.http.get("/v1/batches", params={"limit": 100}).json()
    assert full["object"] == "list"
    ids = [b["id"] for b in full["data"]]
    assert len(ids) >= 3 and all(i.startswith("batch_") for i in ids)
    created = [b["created_at"] for b in full["data"]]
    assert created == sorted(created, reverse=True)

    default = api.http.get("/v1/batches").json()
    assert len(default["data"]) == min(20, len(ids))

    walked: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = api.http.get("/v1/batches", params=params).json()
        assert len(page["data"]) <= 2
        walked += [b["id"] for b in page["data"]]
        assert (page["first_id"], page["last_id"]) == (
            page["data"][0]["id"],
            page["data"][-1]["id"],
        )
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert walked == ids


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"limit": "x"}])
def test_list_limit_outside_1_to_100_is_400(api: Api, params: dict[str, Any]) -> None:
    response = api.http.get("/v1/batches", params=params)
    assert response.status_code == 400
    assert error_of(response)["param"] == "limit"


def test_unknown_batch_is_404(api: Api) -> None:
    for response in (
        api.http.get("/v1/batches/batch_nope"),
        api.http.post("/v1/batches/batch_nope/cancel"),
        api.http.get("/v1/batches/batch_nope/results"),
    ):
        assert response.status_code == 404
        assert error_of(response)["code"] == "batch_not_found"


def test_cancel_queued_batch_never_runs_its_requests(api: Api) -> None:
    before = api.queued_ids()
    ids = [f"q{i}" for i in range(5)]
    batch = create(api, upload(api, [batch_line(i, api.model) for i in ids]))
    (message,) = api.queued_ids()[len(before) :]

    response = api.http.post(f"/v1/batches/{batch['id']}/cancel")
    assert response.status_code == 200
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelling_at"] is not None and cancelled["cancelled_at"] is not None
    assert cancelled["request_counts"] == {"total": 5, "completed": 0, "failed": 0}
    assert cancelled["output_file_id"] is None
    # A worker that now takes the message finds nothing to run.
    assert claim(api.db, message, "test-worker", 60) == []

    error_file = api.http.get(f"/v1/files/{cancelled['error_file_id']}").json()
    assert error_file["purpose"] == "batch_error"
    content = api.http.get(f"/v1/files/{cancelled['error_file_id']}/content").content
    assert error_file["bytes"] == len(content)
    lines = lines_of(content)
    assert [x["custom_id"] for x in lines] == ids
    for x in lines:
        assert x["response"] is None
        assert x["error"]["code"] == "batch_cancelled"
        assert x["id"].startswith("batch_req_")

    again = api.http.post(f"/v1/batches/{batch['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_cancel_failed_batch_is_409(api: Api) -> None:
    batch = create(api, upload(api, [b"not json"]))
    assert batch["status"] == "failed"
    response = api.http.post(f"/v1/batches/{batch['id']}/cancel")
    assert response.status_code == 409
    assert error_of(response)["code"] == "conflict"


def _run(api: Api, ids: list[int], outcome: Callable[[int], Result]) -> None:
    """Play the worker for these request ids: claim them, then write each one's outcome."""
    claimed = claim(api.db, ids, "test-worker", 60)
    assert len(claimed) == len(ids)
    write_results(api.db, "test-worker", [outcome(c.id) for c in claimed])


def test_results_stream_while_running_then_output_and_error_files(api: Api) -> None:
    before = api.queued_ids()
    custom = [f"job-{i}" for i in range(6)]
    batch = create(api, upload(api, [batch_line(c, api.model) for c in custom]))
    (ids,) = api.queued_ids()[len(before) :]
    ids = sorted(ids)  # request ids follow line order

    def ok(rid: int) -> Result:
        return Result(
            id=rid,
            status="succeeded",
            output_text=f"out {rid}",
            finish_reason="stop",
            prompt_tokens=3,
            completion_tokens=2,
            finished_at=time.time(),
        )

    def too_long(rid: int) -> Result:
        return Result(
            id=rid,
            status="failed",
            error_code="context_length_exceeded",
            error_message="the prompt has 9000 tokens; the model takes 8192",
            prompt_tokens=9000,
            finished_at=time.time(),
        )

    _run(api, ids[0:1], ok)
    _run(api, ids[2:3], too_long)
    running = api.http.get(f"/v1/batches/{batch['id']}").json()
    assert running["status"] == "in_progress"
    assert running["request_counts"] == {"total": 6, "completed": 1, "failed": 1}

    so_far = api.http.get(f"/v1/batches/{batch['id']}/results")
    assert so_far.status_code == 200
    lines = lines_of(so_far.content)
    assert [x["custom_id"] for x in lines] == ["job-0", "job-2"]
    success, failure = lines
    assert success["error"] is None
    assert success["response"]["status_code"] == 200
    assert success["response"]["request_id"] == f"req_{ids[0]}"
    completion = success["response"]["body"]
    assert completion["object"] == "chat.completion"
    assert completion["model"] == api.model
    assert completion["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": f"out {ids[0]}", "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert completion["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }  # fmt: skip
    assert failure["error"] is None
    assert failure["response"]["status_code"] == 400
    assert failure["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert failure["response"]["body"]["error"]["type"] == "invalid_request_error"
    resumed = api.http.get(f"/v1/batches/{batch['id']}/results", params={"after_line": 1})
    assert [x["custom_id"] for x in lines_of(resumed.content)] == ["job-2"]

    # job-1 is still open: the resume point stops before it, so when it ends after job-2 a
    # client resuming from the header gets it (resuming after job-2's line would miss it).
    through = int(so_far.headers["Sluice-Complete-Through-Line"])
    results_url = f"/v1/batches/{batch['id']}/results"
    early = api.http.get(results_url, params={"after_line": through})
    assert [x["custom_id"] for x in lines_of(early.content)] == ["job-2"]
    _run(api, ids[1:2], ok)
    late = api.http.get(results_url, params={"after_line": through})
    assert [x["custom_id"] for x in lines_of(late.content)] == ["job-1", "job-2"]
    assert int(late.headers["Sluice-Complete-Through-Line"]) > through

    _run(api, ids[3:], ok)
    done = api.http.get(f"/v1/batches/{batch['id']}").json()
    assert done["status"] == "completed"
    assert done["completed_at"] is not None and done["finalizing_at"] is not None
    assert done["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
    assert done["usage"]["input_tokens"] == 5 * 3 + 9000
    assert done["usage"]["output_tokens"] == 5 * 2
    assert done["usage"]["total_tokens"] == 5 * 3 + 9000 + 5 * 2

    out = api.http.get(f"/v1/files/{done['output_file_id']}/content").content
    assert [x["custom_id"] for x in lines_of(out)] == [c for c in custom if c != "job-2"]
    out_file = api.http.get(f"/v1/files/{done['output_file_id']}").json()
    assert out_file["purpose"] == "batch_output"
    assert out_file["bytes"] == len(out)
    err = api.http.get(f"/v1/files/{done['error_file_id']}/content").content
    assert [x["custom_id"] for x in lines_of(err)] == ["job-2"]
    everything = api.http.get(f"/v1/batches/{batch['id']}/results").content
    assert sorted(x["custom_id"] for x in lines_of(everything)) == sorted(custom)


def test_completions_output_is_text_completion(api: Api) -> None:
    before = api.queued_ids()
    lines = [batch_line("tc", api.model, url="/v1/completions")]
    batch = create(api, upload(api, lines), endpoint="/v1/completions")
    (ids,) = api.queued_ids()[len(before) :]
    _run(
        api,
        ids,
        lambda rid: Result(
            id=rid,
            status="succeeded",
            output_text="done",
            finish_reason="length",
            prompt_tokens=1,
            completion_tokens=4,
            finished_at=time.time(),
        ),
    )
    done = api.http.get(f"/v1/batches/{batch['id']}").json()
    (line,) = lines_of(api.http.get(f"/v1/files/{done['output_file_id']}/content").content)
    body = line["response"]["body"]
    assert body["object"] == "text_completion"
    assert body["choices"] == [
        {"index": 0, "text": "done", "finish_reason": "length", "logprobs": None}
    ]


def test_official_openai_client_against_the_api(api: Api) -> None:
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=api.key, max_retries=0)
    content = jsonl([batch_line(f"oa-{i}", api.model) for i in range(3)])
    uploaded = client.files.create(file=("oa.jsonl", content), purpose="batch")
    assert uploaded.bytes == len(content) and uploaded.purpose == "batch"
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert client.files.content(uploaded.id).content == content

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"run": "openai"},
    )
    assert batch.status == "in_progress"
    assert batch.request_counts is not None and batch.request_counts.total == 3
    assert client.batches.retrieve(batch.id).id == batch.id
    assert batch.id in [b.id for b in client.batches.list(limit=100).data]

    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelled"
    assert cancelled.error_file_id is not None
    lines = lines_of(client.files.content(cancelled.error_file_id).content)
    assert [x["custom_id"] for x in lines] == ["oa-0", "oa-1", "oa-2"]

    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")
    with pytest.raises(openai.BadRequestError) as bad:
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
    assert bad.value.param == "endpoint"
    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted is True


def test_cancel_running_batch_tells_workers_and_keeps_partial_results(api: Api) -> None:
    before = api.queued_ids()
    custom = [f"run-{i}" for i in range(4)]
    batch = create(api, upload(api, [batch_line(c, api.model) for c in custom]))
    (ids,) = api.queued_ids()[len(before) :]
    ids = sorted(ids)
    running = claim(api.db, ids[:1], "test-worker", 60)
    assert len(running) == 1

    listener = api.redis.pubsub()  # type: ignore[no-untyped-call]
    listener.subscribe(CANCEL_CHANNEL)
    try:
        assert listener.get_message(timeout=5)["type"] == "subscribe"
        response = api.http.post(f"/v1/batches/{batch['id']}/cancel")
        assert response.status_code == 200
        cancelling = response.json()
        assert cancelling["status"] == "cancelling"
        assert cancelling["cancelling_at"] is not None and cancelling["cancelled_at"] is None
        heard = None
        deadline = time.monotonic() + 10
        while heard is None and time.monotonic() < deadline:
            message = listener.get_message(timeout=1)
            if message and message["type"] == "message" and message["data"] == batch["id"].encode():
                heard = message
        assert heard is not None, "workers were not told about the cancel"
    finally:
        listener.close()

    # The running request finishes; its result is kept and the batch ends cancelled.
    write_results(api.db, "test-worker", [Result(
        id=running[0].id, status="succeeded", output_text="made it", finish_reason="stop",
        prompt_tokens=1, completion_tokens=2, finished_at=time.time())])  # fmt: skip
    done = api.http.get(f"/v1/batches/{batch['id']}").json()
    assert done["status"] == "cancelled"
    assert done["request_counts"] == {"total": 4, "completed": 1, "failed": 0}
    out = lines_of(api.http.get(f"/v1/files/{done['output_file_id']}/content").content)
    assert [x["custom_id"] for x in out] == ["run-0"]
    assert out[0]["response"]["body"]["choices"][0]["message"]["content"] == "made it"
    err = lines_of(api.http.get(f"/v1/files/{done['error_file_id']}/content").content)
    assert [(x["custom_id"], x["error"]["code"]) for x in err] == [
        ("run-1", "batch_cancelled"), ("run-2", "batch_cancelled"), ("run-3", "batch_cancelled")
    ]  # fmt: skip


def test_nul_in_custom_id_or_model_is_a_line_error_not_a_500(api: Api) -> None:
    # A JSON escape decodes to NUL, which PostgreSQL text cannot store.
    m = api.model
    file_id = upload(api, [batch_line("ok", m), batch_line("bad\u0000id", m),
                           batch_line("m", "mod\u0000el")])  # fmt: skip
    batch = create(api, file_id)
    assert batch["status"] == "failed"
    assert [(e["line"], e["param"]) for e in batch["errors"]["data"]] == [
        (2, "custom_id"),
        (3, "body.model"),
    ]
