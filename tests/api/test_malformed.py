"""Hostile and malformed input, one row each: the exact status and the error it answers.

Every row runs on SQLite and on PostgreSQL (which cannot store NUL in text, and whose
varchar columns refuse what is too long): bad input must be refused where it enters, as a
clean 4xx in OpenAI's error shape naming the field (or the line of a batch file).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.api.helpers import Api, batch_line, error_of, jsonl, multipart

NUL = "\x00"
BIG = 2**70  # past 64 bits: json re-parsers would turn it into a float


@dataclass
class Case:
    """One request and what it must answer."""

    name: str
    method: str
    path: str
    status: int
    code: str | None
    param: str | None
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def job(**fields: Any) -> dict[str, Any]:
    """A job body: a valid completions prompt with these fields over it."""
    return {"prompt": "hello", **fields}


def chat(content: Any = "hi", role: Any = "user", **fields: Any) -> dict[str, Any]:
    """A chat job body with one message."""
    return {"messages": [{"role": role, "content": content}], **fields}


def batch(**fields: Any) -> dict[str, Any]:
    """A batch creation body on the module's good file ({file} is filled in)."""
    return {"input_file_id": "{file}", "endpoint": "/v1/chat/completions", **fields}


J, B = "/v1/jobs", "/v1/batches"
# fmt: off
BAD_JOBS = [
    Case("job: not JSON", "POST", J, 400, "invalid_json", None, content=b"{nope"),
    Case("job: a JSON list", "POST", J, 400, "invalid_value", None, json=[1]),
    Case("job: no body", "POST", J, 400, "missing_required_parameter", None),
    Case("job: unknown field", "POST", J, 400, "unknown_parameter", "foo", json=job(foo=1)),
    Case("job: prompt and messages", "POST", J, 400, "invalid_value", "prompt",
         json={**chat(), "prompt": "x"}),
    Case("job: neither prompt nor messages", "POST", J, 400, "missing_required_parameter",
         "messages", json={"max_tokens": 5}),
    Case("job: 300-char model", "POST", J, 400, "invalid_value", "model",
         json=job(model="m" * 300)),
    Case("job: NUL in model", "POST", J, 400, "invalid_value", "model",
         json=job(model=f"a{NUL}b")),
    Case("job: model not served", "POST", J, 404, "model_not_found", "model",
         json=job(model="gpt-9")),
    Case("job: model not a string", "POST", J, 400, "invalid_value", "model", json=job(model=5)),
    Case("job: NUL in prompt", "POST", J, 400, "invalid_value", "prompt",
         json={"prompt": f"a{NUL}b"}),
    Case("job: NUL in message content", "POST", J, 400, "invalid_value", "messages.0.content",
         json=chat(f"x{NUL}")),
    Case("job: NUL in a message key", "POST", J, 400, "invalid_value", "messages.0.\\u0000",
         json={"messages": [{"role": "user", "content": "x", NUL: 1}]}),
    Case("job: NUL in user", "POST", J, 400, "invalid_value", "user", json=job(user=NUL)),
    Case("job: NUL in stop", "POST", J, 400, "invalid_value", "stop.0", json=job(stop=[NUL])),
    Case("job: bad role", "POST", J, 400, "invalid_value", "messages.0.role",
         json=chat(role="wizard")),
    Case("job: content not text", "POST", J, 400, "invalid_value", "messages.0.content",
         json=chat(content=5)),
    Case("job: messages not a list", "POST", J, 400, "invalid_value", "messages",
         json={"messages": "hi"}),
    Case("job: messages empty", "POST", J, 400, "invalid_value", "messages",
         json={"messages": []}),
    Case("job: prompt a number", "POST", J, 400, "invalid_value", "prompt", json={"prompt": 5}),
    Case("job: prompt two strings", "POST", J, 400, "invalid_value", "prompt",
         json={"prompt": ["a", "b"]}),
    Case("job: max_tokens 0", "POST", J, 400, "invalid_value", "max_tokens",
         json=job(max_tokens=0)),
    Case("job: max_tokens negative", "POST", J, 400, "invalid_value", "max_tokens",
         json=job(max_tokens=-5)),
    Case("job: max_tokens 2^70", "POST", J, 400, "invalid_value", "max_tokens",
         json=job(max_tokens=BIG)),
    Case("job: max_tokens over the model", "POST", J, 400, "invalid_value", "max_tokens",
         json=job(max_tokens=8193)),
    Case("job: max_tokens a string", "POST", J, 400, "invalid_value", "max_tokens",
         json=job(max_tokens="5")),
    Case("job: max_tokens a float", "POST", J, 400, "invalid_value", "max_tokens",
         json=job(max_tokens=1.5)),
    Case("job: max_completion_tokens 0", "POST", J, 400, "invalid_value",
         "max_completion_tokens", json=job(max_completion_tokens=0)),
    Case("job: seed 2^63", "POST", J, 400, "invalid_value", "seed", json=job(seed=2**63)),
    Case("job: seed below -2^63", "POST", J, 400, "invalid_value", "seed",
         json=job(seed=-(2**63) - 1)),
    Case("job: seed 2^70", "POST", J, 400, "invalid_value", "seed", json=job(seed=BIG)),
    Case("job: seed a float", "POST", J, 400, "invalid_value", "seed", json=job(seed=1.5)),
    Case("job: top_p 0", "POST", J, 400, "invalid_value", "top_p", json=job(top_p=0)),
    Case("job: top_p over 1", "POST", J, 400, "invalid_value", "top_p", json=job(top_p=1.5)),
    Case("job: top_p negative", "POST", J, 400, "invalid_value", "top_p", json=job(top_p=-0.1)),
    Case("job: temperature 3", "POST", J, 400, "invalid_value", "temperature",
         json=job(temperature=3)),
    Case("job: temperature 1e400 (inf)", "POST", J, 400, "invalid_value", "temperature",
         content=b'{"prompt": "x", "temperature": 1e400}'),
    Case("job: presence_penalty 5", "POST", J, 400, "invalid_value", "presence_penalty",
         json=job(presence_penalty=5)),
    Case("job: frequency_penalty -5", "POST", J, 400, "invalid_value", "frequency_penalty",
         json=job(frequency_penalty=-5)),
    Case("job: n 0", "POST", J, 400, "invalid_value", "n", json=job(n=0)),
    Case("job: n true", "POST", J, 400, "invalid_value", "n", json=job(n=True)),
    Case("job: stream", "POST", J, 400, "invalid_value", "stream", json=job(stream=True)),
    Case("job: five stop strings", "POST", J, 400, "invalid_value", "stop",
         json=job(stop=["a", "b", "c", "d", "e"])),
    Case("job: empty stop string", "POST", J, 400, "invalid_value", "stop", json=job(stop=[""])),
    Case("job: ignore_eos a string", "POST", J, 400, "invalid_value", "ignore_eos",
         json=job(ignore_eos="yes")),
    Case("job: body over max_body_bytes", "POST", J, 413, "request_too_large", None,
         json=job(user="u" * 1_100_000)),
]
BAD_BATCHES = [
    Case("batch: window 999999h", "POST", B, 400, "invalid_value", "completion_window",
         json=batch(completion_window="999999h")),
    Case("batch: window of 20 digits", "POST", B, 400, "invalid_value", "completion_window",
         json=batch(completion_window="99999999999999999999h")),
    Case("batch: window 8d (over the maximum)", "POST", B, 400, "invalid_value",
         "completion_window", json=batch(completion_window="8d")),
    Case("batch: window 0h", "POST", B, 400, "invalid_value", "completion_window",
         json=batch(completion_window="0h")),
    Case("batch: window 24x", "POST", B, 400, "invalid_value", "completion_window",
         json=batch(completion_window="24x")),
    Case("batch: window a number", "POST", B, 400, "invalid_value", "completion_window",
         json=batch(completion_window=24)),
    Case("batch: endpoint not served", "POST", B, 400, "invalid_value", "endpoint",
         json=batch(endpoint="/v1/embeddings")),
    Case("batch: NUL in input_file_id", "POST", B, 400, "invalid_value", "input_file_id",
         json=batch(input_file_id=f"file-{NUL}")),
    Case("batch: 300-char input_file_id", "POST", B, 400, "invalid_value", "input_file_id",
         json=batch(input_file_id="f" * 300)),
    Case("batch: no input_file_id", "POST", B, 400, "missing_required_parameter",
         "input_file_id", json={"endpoint": "/v1/chat/completions"}),
    Case("batch: 17 metadata pairs", "POST", B, 400, "invalid_value", "metadata",
         json=batch(metadata={str(i): "v" for i in range(17)})),
    Case("batch: 600-char metadata value", "POST", B, 400, "invalid_value", "metadata",
         json=batch(metadata={"k": "v" * 600})),
    Case("batch: 65-char metadata key", "POST", B, 400, "invalid_value", "metadata",
         json=batch(metadata={"k" * 65: "v"})),
    Case("batch: NUL in a metadata key", "POST", B, 400, "invalid_value", "metadata",
         json=batch(metadata={NUL: "v"})),
    Case("batch: NUL in a metadata value", "POST", B, 400, "invalid_value", "metadata",
         json=batch(metadata={"k": NUL})),
    Case("batch: metadata value a number", "POST", B, 400, "invalid_value", "metadata.k",
         json=batch(metadata={"k": 5})),
]
LONG_ID = "x" * 65
BAD_PATHS_AND_QUERIES = [
    Case("path: NUL in a file id", "GET", "/v1/files/file-%00", 400, "invalid_value", "file_id"),
    Case("path: NUL in file content's id", "GET", "/v1/files/file-%00/content", 400,
         "invalid_value", "file_id"),
    Case("path: 65-char file id on delete", "DELETE", f"/v1/files/{LONG_ID}", 400,
         "invalid_value", "file_id"),
    Case("path: NUL in a batch id", "GET", "/v1/batches/batch_%00", 400, "invalid_value",
         "batch_id"),
    Case("path: NUL in a batch id to cancel", "POST", "/v1/batches/%00/cancel", 400,
         "invalid_value", "batch_id"),
    Case("path: 300-char batch id for results", "GET", f"/v1/batches/{'b' * 300}/results", 400,
         "invalid_value", "batch_id"),
    Case("path: NUL in a job id", "GET", "/v1/jobs/job_%00", 400, "invalid_value", "job_id"),
    Case("path: 65-char job id to cancel", "POST", f"/v1/jobs/{LONG_ID}/cancel", 400,
         "invalid_value", "job_id"),
    Case("path: NUL in a model id", "GET", "/v1/models/a%00b", 400, "invalid_value", "model_id"),
    Case("query: NUL in files' after", "GET", "/v1/files?after=file-%00", 400, "invalid_value",
         "after"),
    Case("query: NUL in batches' after", "GET", "/v1/batches?after=%00", 400, "invalid_value",
         "after"),
    Case("query: 65-char after", "GET", f"/v1/batches?after={LONG_ID}", 400, "invalid_value",
         "after"),
    Case("query: files limit 0", "GET", "/v1/files?limit=0", 400, "invalid_value", "limit"),
    Case("query: batches limit 101", "GET", "/v1/batches?limit=101", 400, "invalid_value",
         "limit"),
    Case("query: limit of 30 digits", "GET", f"/v1/files?limit={'9' * 30}", 400,
         "invalid_value", "limit"),
    Case("query: order sideways", "GET", "/v1/files?order=sideways", 400, "invalid_value",
         "order"),
    Case("query: NUL in purpose", "GET", "/v1/files?purpose=%00", 400, "invalid_value",
         "purpose"),
    Case("query: after_line -1", "GET", "/v1/batches/batch_x/results?after_line=-1", 400,
         "invalid_value", "after_line"),
    Case("query: after_line of 20 digits", "GET",
         f"/v1/batches/batch_x/results?after_line={'9' * 20}", 400, "invalid_value",
         "after_line"),
    Case("query: wait 1e309", "GET", "/v1/jobs/job_x?wait=1e309", 400, "invalid_value", "wait"),
    Case("query: wait -1", "GET", "/v1/jobs/job_x?wait=-1", 400, "invalid_value", "wait"),
    Case("query: misspelt limit", "GET", "/v1/batches?limt=5", 400, "unknown_parameter",
         "limt"),
    Case("query: empty name", "GET", "/v1/batches?=0.0", 400, "unknown_parameter", ""),
    Case("query: on a route with none", "GET", "/v1/models?x=1", 400, "unknown_parameter",
         "x"),
]
FILE_PARTS = [("purpose", None, b"batch")]
BAD_UPLOADS = [
    Case("upload: NUL in the filename", "POST", "/v1/files", 400, "invalid_value", "file",
         content=multipart([*FILE_PARTS, ("file", "a\x00b.jsonl", b"{}\n")])[0]),
    Case("upload: 300-char filename", "POST", "/v1/files", 400, "invalid_value", "file",
         content=multipart([*FILE_PARTS, ("file", "f" * 300 + ".jsonl", b"{}\n")])[0]),
    Case("upload: purpose fine-tune", "POST", "/v1/files", 400, "invalid_value", "purpose",
         content=multipart([("purpose", None, b"fine-tune"), ("file", "a.jsonl", b"{}\n")])[0]),
    Case("upload: no file part", "POST", "/v1/files", 400, "missing_required_parameter", "file",
         content=multipart(FILE_PARTS)[0]),
    Case("upload: part headers of 20 kB", "POST", "/v1/files", 400, "invalid_request", "file",
         content=multipart([*FILE_PARTS, ("file", "a.jsonl" + " " * 20_000, b"{}\n")])[0]),
    Case("upload: not multipart", "POST", "/v1/files", 400, "invalid_value", "file",
         content=b"{}", headers={"content-type": "application/json"}),
    Case("upload: declared size over the limit", "POST", "/v1/files", 413, "file_too_large",
         "file", content=b"x" * 400_000),
]
# fmt: on
CASES = BAD_JOBS + BAD_BATCHES + BAD_PATHS_AND_QUERIES + BAD_UPLOADS


@pytest.fixture(scope="module")
def good_file(api: Api) -> str:
    """An uploaded, valid input file for batch-creation rows."""
    response = api.upload(jsonl([batch_line("a", api.model)]))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def _fill(value: Any, file_id: str) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, file_id) for k, v in value.items()}
    return file_id if value == "{file}" else value


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_request(api: Api, good_file: str, case: Case) -> None:
    headers = dict(case.headers)
    content = case.content
    if case.json is not None:
        content = json.dumps(_fill(case.json, good_file)).encode()
    if content is not None:
        default = multipart([])[1] if case.path == "/v1/files" else {}
        headers.setdefault("content-type", default.get("content-type", "application/json"))
    response = api.http.request(case.method, case.path, content=content, headers=headers)
    assert response.status_code == case.status, response.text
    err = error_of(response)
    assert (err["code"], err["param"], err["line"]) == (case.code, case.param, None), err


@dataclass
class LineCase:
    """A batch file whose line 2 is bad, and the error the batch lists for it."""

    name: str
    line: bytes | dict[str, Any]
    code: str
    param: str | None


def line(model: str = "{model}", **body: Any) -> dict[str, Any]:
    """Line 2: a chat line with these body fields."""
    return batch_line("two", model, body={"model": model, **chat(), **body})


# fmt: off
BAD_LINES = [
    LineCase("not JSON", b"{nope", "invalid_json_line", None),
    LineCase("blank", b"   ", "invalid_json_line", None),
    LineCase("not UTF-8", b'{"custom_id": "\xff"}', "invalid_json_line", None),
    LineCase("a raw NUL byte", b'{"custom_id": "a\x00"}', "invalid_json_line", None),
    LineCase("a JSON array", b"[1, 2]", "invalid_json_line", None),
    LineCase("too long", b'{"x": "' + b"y" * 5000 + b'"}', "line_too_long", None),
    LineCase("no custom_id", {**line(), "custom_id": None}, "missing_required_parameter",
             "custom_id"),
    LineCase("600-char custom_id", {**line(), "custom_id": "c" * 600}, "invalid_value",
             "custom_id"),
    LineCase("NUL in custom_id", {**line(), "custom_id": f"c{NUL}"}, "invalid_value",
             "custom_id"),
    LineCase("NUL in an extra field", {**line(), "note": NUL}, "invalid_value", "note"),
    LineCase("method GET", {**line(), "method": "GET"}, "invalid_method", "method"),
    LineCase("url not served", {**line(), "url": "/v1/embeddings"}, "invalid_url", "url"),
    LineCase("300-char model", line("m" * 300), "invalid_value", "body.model"),
    LineCase("NUL in model", line(f"m{NUL}"), "invalid_value", "body.model"),
    LineCase("NUL in message content", line(messages=[{"role": "user", "content": NUL}]),
             "invalid_value", "body.messages[0].content"),
    # orjson reads integers past 64 bits as floats: refused as not an integer.
    LineCase("max_tokens 2^70", line(max_tokens=BIG), "invalid_value", "body.max_tokens"),
    LineCase("seed 2^70", line(seed=BIG), "invalid_value", "body.seed"),
    LineCase("max_tokens over the model", line(max_tokens=8193), "invalid_value",
             "body.max_tokens"),
    LineCase("seed 2^63", line(seed=2**63), "invalid_value", "body.seed"),
    LineCase("top_p 0", line(top_p=0), "invalid_value", "body.top_p"),
    LineCase("n 1.0", line(n=1.0), "invalid_value", "body.n"),
    LineCase("model not served", line("gpt-9"), "model_not_found", "body.model"),
    LineCase("duplicate custom_id", {**line(), "custom_id": "one"}, "duplicate_custom_id",
             "custom_id"),
]
# fmt: on


def _encode(item: bytes | dict[str, Any], model: str) -> bytes:
    if isinstance(item, bytes):
        return item
    text = json.dumps(item).replace("{model}", model)
    return text.encode()


@pytest.mark.parametrize("case", BAD_LINES, ids=[c.name for c in BAD_LINES])
def test_malformed_batch_line(api: Api, case: LineCase) -> None:
    content = jsonl([batch_line("one", api.model), _encode(case.line, api.model)])
    uploaded = api.upload(content)
    assert uploaded.status_code == 200, uploaded.text
    response = api.http.post(
        "/v1/batches",
        json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions"},
    )
    assert response.status_code == 200, response.text
    created = response.json()
    assert created["status"] == "failed"
    errors = [(e["code"], e["line"], e["param"]) for e in created["errors"]["data"]]
    # A model not served also makes the file's models mismatched (a file-level error).
    assert [e for e in errors if e[1] is not None] == [(case.code, 2, case.param)], errors


def _lines(n: int, model: str, bad_every: int) -> Iterator[bytes]:
    for i in range(1, n + 1):
        yield b"{nope" if i % bad_every == 0 else json.dumps(batch_line(f"r{i}", model)).encode()


def test_too_many_lines_is_listed_before_a_thousand_line_errors(api: Api) -> None:
    limit = api.settings.max_file_lines
    content = b"\n".join(_lines(2 * limit + 2, api.model, bad_every=2)) + b"\n"
    uploaded = api.upload(content)
    assert uploaded.status_code == 200, uploaded.text
    response = api.http.post(
        "/v1/batches",
        json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions"},
    )
    errors = response.json()["errors"]["data"]
    assert errors[0]["code"] == "too_many_tasks" and errors[0]["line"] is None
    assert str(2 * limit + 2) in errors[0]["message"]
    assert len(errors) == 1000
    assert {e["code"] for e in errors[1:]} == {"invalid_json_line"}
