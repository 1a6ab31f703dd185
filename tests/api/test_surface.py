"""The request surface over HTTP: /v1/jobs and batch lines refuse the same fields, by name."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest

from sluice.capabilities import CAPABILITIES, OPTIONAL
from tests.api.helpers import Api, batch_line, error_of, jsonl

JSON_OBJECT = {"type": "json_object"}


def job(api: Api, **fields: Any) -> Any:
    return api.http.post("/v1/jobs", json={"prompt": "hello there", **fields})


def test_job_refuses_what_the_engine_cannot_honour_naming_it(api: Api) -> None:
    # echo honours the sampler fields and n; it cannot follow a schema.
    ok = job(api, top_k=5, min_p=0.1, repetition_penalty=1.1, n=2, seed=3, logprobs=2,
             user="u", metadata={"k": "v"}, max_completion_tokens=4)  # fmt: skip
    assert ok.status_code == 202, ok.text
    bad = job(api, response_format=JSON_OBJECT)
    assert bad.status_code == 400
    err = error_of(bad)
    assert (err["param"], err["code"]) == ("response_format", "unsupported_parameter")
    assert "echo" in err["message"]
    tools = job(api, messages=[{"role": "user", "content": "x"}], prompt=None,
                tools=[{"type": "function", "function": {"name": "f"}}])  # fmt: skip
    assert tools.status_code == 400 and error_of(tools)["param"] == "tools"


def test_batch_lines_are_checked_like_jobs(api: Api) -> None:
    m = api.model
    chat = {"model": m, "messages": [{"role": "user", "content": "hi"}]}
    lines = [
        batch_line("ok", m, body={**chat, "top_k": 4, "logprobs": True, "n": 2}),
        batch_line("fmt", m, body={**chat, "response_format": JSON_OBJECT}),
        batch_line("typo", m, body={**chat, "temprature": 0.2}),
        batch_line("tools", m, body={**chat, "tools": [{"type": "function"}]}),
        batch_line("embed", m, url="/v1/embeddings", body={"model": m, "input": "x"}),
    ]
    up = api.upload(jsonl(lines))
    assert up.status_code == 200, up.text
    created = api.http.post(
        "/v1/batches",
        json={"input_file_id": up.json()["id"], "endpoint": "/v1/chat/completions"},
    )
    batch = created.json()
    assert batch["status"] == "failed", batch
    by_line = {e["line"]: e for e in batch["errors"]["data"] if e["line"] is not None}
    assert 1 not in by_line
    assert (by_line[2]["param"], by_line[2]["code"]) == ("body.response_format",
                                                         "unsupported_parameter")  # fmt: skip
    assert (by_line[3]["param"], by_line[3]["code"]) == ("body.temprature", "unknown_parameter")
    assert by_line[4]["param"] == "body.tools"
    assert by_line[5]["param"] == "url" and "pooling" in by_line[5]["message"]


def test_embeddings_batch_is_refused_saying_why(api: Api) -> None:
    up = api.upload(jsonl([batch_line("a", api.model)]))
    created = api.http.post(
        "/v1/batches", json={"input_file_id": up.json()["id"], "endpoint": "/v1/embeddings"}
    )
    assert created.status_code == 400
    err = error_of(created)
    assert err["param"] == "endpoint" and "pooling" in err["message"]


def test_sim_engine_refuses_n_and_logprobs(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    with start_api(engine="sim") as sim:
        for fields, param in (({"n": 2}, "n"), ({"logprobs": 1}, "logprobs")):
            bad = job(sim, **fields)
            assert bad.status_code == 400, bad.text
            assert error_of(bad)["param"] == param
        assert job(sim, top_k=3, presence_penalty=0.4).status_code == 202


# One use of each optional field in a completions job.
JOB_CASES: dict[str, dict[str, Any]] = {
    "n": {"n": 2},
    "seed": {"seed": 1},
    "top_k": {"top_k": 3},
    "min_p": {"min_p": 0.2},
    "repetition_penalty": {"repetition_penalty": 1.2},
    "presence_penalty": {"presence_penalty": 0.3},
    "frequency_penalty": {"frequency_penalty": 0.3},
    "logprobs": {"logprobs": 2},
    "response_format": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}, "strict": True}}},
    "ignore_eos": {"ignore_eos": True},
}  # fmt: skip


@pytest.mark.parametrize("engine", sorted(CAPABILITIES))
def test_every_optional_field_per_engine_over_http(
    start_api: Callable[..., AbstractContextManager[Api]], engine: str
) -> None:
    assert set(JOB_CASES) == OPTIONAL
    with start_api(engine=engine) as running:
        for field, fields in JOB_CASES.items():
            answer = job(running, **fields)
            if field in CAPABILITIES[engine]:
                assert answer.status_code == 202, (field, answer.text)
            else:
                assert answer.status_code == 400, (field, answer.text)
                err = error_of(answer)
                assert (err["param"], err["code"]) == (field, "unsupported_parameter")
