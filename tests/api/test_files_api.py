"""Files over real HTTP: streamed multipart upload, limits, listing, content, delete."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select, text

from sluice.models import file_lines, files
from tests.api.helpers import BOUNDARY, Api, batch_line, error_of, jsonl, multipart


def count_rows(api: Api) -> tuple[int, int]:
    """(files, file_lines) rows in the database."""
    with api.db.read() as conn:
        n_files = conn.execute(select(func.count()).select_from(files)).scalar_one()
        n_lines = conn.execute(select(func.count()).select_from(file_lines)).scalar_one()
    return int(n_files), int(n_lines)


def test_upload_then_content_returns_the_same_bytes(api: Api) -> None:
    content = jsonl(
        [batch_line(f"r{i}", api.model) for i in range(5)]
        + [
            batch_line(
                "unicode",
                api.model,
                body={
                    "model": api.model,
                    "messages": [{"role": "user", "content": "héllo ✓ 世界"}],
                },
            )
        ]
    )
    response = api.upload(content, filename="my input.jsonl")
    assert response.status_code == 200, response.text
    obj = response.json()
    assert set(obj) == {
        "id",
        "object",
        "bytes",
        "created_at",
        "filename",
        "purpose",
        "expires_at",
        "status",
        "status_details",
    }
    assert obj["id"].startswith("file-")
    assert obj["object"] == "file"
    assert obj["bytes"] == len(content)
    assert obj["filename"] == "my input.jsonl"
    assert obj["purpose"] == "batch"
    assert obj["status"] == "processed"
    assert obj["expires_at"] > obj["created_at"]

    got = api.http.get(f"/v1/files/{obj['id']}/content")
    assert got.status_code == 200
    assert got.content == content
    assert got.headers["content-type"].startswith("application/jsonl")
    assert api.http.get(f"/v1/files/{obj['id']}").json() == obj


@pytest.mark.parametrize(
    "ending",
    [b"\r\n", b"\n"],
    ids=["crlf", "lf"],
)
@pytest.mark.parametrize("final_newline", [True, False], ids=["final-nl", "no-final-nl"])
def test_content_is_the_uploaded_bytes_exactly(
    api: Api, ending: bytes, final_newline: bool
) -> None:
    lines = [json.dumps(batch_line(f"x{i}", api.model)).encode() for i in range(3)]
    # A blank line and a lone \r inside the file are bytes too.
    content = ending.join([*lines, b"", b"\r"]) + (ending if final_newline else b"")
    response = api.upload(content)
    assert response.status_code == 200, response.text
    got = api.http.get(f"/v1/files/{response.json()['id']}/content").content
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(content).hexdigest(), (got, content)
    assert response.json()["bytes"] == len(content)


def test_crlf_file_runs_as_a_batch(api: Api) -> None:
    content = b"\r\n".join(json.dumps(batch_line(f"c{i}", api.model)).encode() for i in range(3))
    file_id = api.upload(content + b"\r\n").json()["id"]
    created = api.http.post(
        "/v1/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert created.status_code == 200, created.text
    assert created.json()["status"] != "failed", created.json()["errors"]


def test_bad_lines_are_kept_as_empty_lines(api: Api) -> None:
    good = jsonl([batch_line("a", api.model)])
    response = api.upload(good + b"\xff\xfe not utf-8\n" + good)
    assert response.status_code == 200
    got = api.http.get(f"/v1/files/{response.json()['id']}/content").content
    assert got.split(b"\n") == [good.rstrip(b"\n"), b"", good.rstrip(b"\n"), b""]


def test_purpose_after_the_file_part_is_accepted(api: Api) -> None:
    content = jsonl([batch_line("late", api.model)])
    body, headers = multipart([("file", "x.jsonl", content), ("purpose", None, b"batch")])
    response = api.http.post("/v1/files", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert api.http.get(f"/v1/files/{response.json()['id']}/content").content == content


@pytest.mark.parametrize(
    ("parts", "param"),
    [
        ([("purpose", None, b"fine-tune"), ("file", "x.jsonl", b"{}\n")], "purpose"),
        ([("file", "x.jsonl", b"{}\n"), ("purpose", None, b"assistants")], "purpose"),
        ([("file", "x.jsonl", b"{}\n")], "purpose"),
        ([("purpose", None, b"batch")], "file"),
        ([("purpose", None, b"batch"), ("upload", "x.jsonl", b"{}\n")], "file"),
        (
            [
                ("purpose", None, b"batch"),
                ("file", "a.jsonl", b"{}\n"),
                ("file", "b.jsonl", b"{}\n"),
            ],
            "file",
        ),
    ],
)
def test_bad_upload_names_the_field_and_stores_nothing(
    api: Api, parts: list[tuple[str, str | None, bytes]], param: str
) -> None:
    before = count_rows(api)
    body, headers = multipart(parts)
    response = api.http.post("/v1/files", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param
    assert count_rows(api) == before


def test_not_multipart_is_400(api: Api) -> None:
    response = api.http.post("/v1/files", json={"file": "x", "purpose": "batch"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "file"


def test_truncated_multipart_is_400_and_stores_nothing(api: Api) -> None:
    before = count_rows(api)
    body, headers = multipart(
        [("purpose", None, b"batch"), ("file", "x.jsonl", jsonl([batch_line("t", api.model)]))]
    )
    response = api.http.post(
        "/v1/files", content=body[: -len(f"--{BOUNDARY}--\r\n") - 10], headers=headers
    )
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == "file"
    assert count_rows(api) == before


def test_declared_length_over_limit_is_413_before_the_body_is_read(api: Api) -> None:
    # Declare far more than is sent: if the server waited for the body, no answer would come.
    url = urlsplit(api.url)
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {50 * 1024**3}\r\n{api.auth_line.decode()}\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head + f"--{BOUNDARY}\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    status_line = reply.split(b"\r\n", 1)[0]
    assert b" 413 " in status_line, reply


def test_over_limit_while_streaming_is_413_and_stores_nothing(api: Api) -> None:
    before = count_rows(api)
    line = jsonl([batch_line("x" * 20, api.model)])
    limit = api.settings.max_file_bytes

    def body() -> Iterator[bytes]:
        # No Content-Length (chunked): only counting while streaming can catch this one.
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            'filename="big.jsonl"\r\n\r\n'
        ).encode()
        sent = 0
        while sent <= 2 * limit:
            yield line * 100
            sent += len(line) * 100
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    response = api.http.post(
        "/v1/files",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert response.status_code == 413, response.text
    err = response.json()["error"]
    assert err["code"] == "file_too_large" and err["param"] == "file"
    assert count_rows(api) == before


def test_just_under_the_limit_is_accepted(api: Api) -> None:
    line = jsonl([batch_line("y" * 10, api.model)])
    content = line * (api.settings.max_file_bytes // len(line))
    assert len(content) <= api.settings.max_file_bytes
    response = api.upload(content)
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == len(content)


def test_list_pages_cover_every_file_once(api: Api) -> None:
    for i in range(3):
        assert api.upload(jsonl([batch_line(f"p{i}", api.model)])).status_code == 200
    full = api.http.get("/v1/files").json()
    assert full["object"] == "list" and full["has_more"] is False
    ids = [f["id"] for f in full["data"]]
    assert len(ids) >= 3 and len(set(ids)) == len(ids)
    created = [f["created_at"] for f in full["data"]]
    assert created == sorted(created, reverse=True)

    walked: list[str] = []
    after = None
    while True:
        params: dict[str, str | int] = {"limit": 2, **({"after": after} if after else {})}
        page = api.http.get("/v1/files", params=params).json()
        walked += [f["id"] for f in page["data"]]
        assert page["first_id"] == page["data"][0]["id"]
        assert page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert walked == ids

    ascending = api.http.get("/v1/files", params={"order": "asc"}).json()
    assert [f["id"] for f in ascending["data"]] == ids[::-1]
    only_batch = api.http.get("/v1/files", params={"purpose": "batch"}).json()
    assert {f["purpose"] for f in only_batch["data"]} == {"batch"}


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"order": "sideways"}, "order"),
        ({"purpose": "fine-tune"}, "purpose"),
        ({"after": "file-nope"}, "after"),
    ],
)
def test_bad_list_parameters_name_the_field(
    api: Api, params: dict[str, str | int], param: str
) -> None:
    response = api.http.get("/v1/files", params=params)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_unknown_file_is_404(api: Api) -> None:
    for response in (
        api.http.get("/v1/files/file-nope"),
        api.http.get("/v1/files/file-nope/content"),
        api.http.delete("/v1/files/file-nope"),
    ):
        assert response.status_code == 404
        assert error_of(response)["code"] == "file_not_found"


def test_delete_removes_file_and_lines_but_not_while_a_batch_reads_it(api: Api) -> None:
    file_id = api.upload(jsonl([batch_line(f"d{i}", api.model) for i in range(4)])).json()["id"]
    batch = api.http.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    ).json()
    assert batch["status"] == "in_progress"

    response = api.http.delete(f"/v1/files/{file_id}")
    assert response.status_code == 409
    assert error_of(response)["code"] == "conflict"

    assert api.http.post(f"/v1/batches/{batch['id']}/cancel").json()["status"] == "cancelled"
    response = api.http.delete(f"/v1/files/{file_id}")
    assert response.status_code == 200
    assert response.json() == {"id": file_id, "object": "file", "deleted": True}
    assert api.http.get(f"/v1/files/{file_id}").status_code == 404
    with api.db.read() as conn:
        left = conn.execute(
            select(func.count()).select_from(file_lines).where(file_lines.c.file_id == file_id)
        ).scalar_one()
    assert left == 0
    # The finished batch still renders its error file without the input lines.
    error_file = api.http.get(f"/v1/files/{batch_id_error_file(api, batch['id'])}/content")
    assert error_file.status_code == 200
    assert len(error_file.content.splitlines()) == 4


def batch_id_error_file(api: Api, batch_id: str) -> str:
    """The error file id of a batch."""
    error_file_id = api.http.get(f"/v1/batches/{batch_id}").json()["error_file_id"]
    assert error_file_id
    return str(error_file_id)


def _open_upload_transactions(api: Api) -> int:
    """Server connections to this database still inside a transaction (PostgreSQL)."""
    with api.db.read() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
                )
            ).scalar_one()
        )


def _busy_uploads(api: Api) -> int:
    """Uploads the server holds open: transactions (PostgreSQL) or spool files (SQLite)."""
    if api.db.is_postgres:
        return _open_upload_transactions(api)
    # Spool files are anonymous (O_TMPFILE); the server runs in this process, so its open
    # files are ours to see.
    spool = str((api.settings.data_dir / "uploads").resolve())
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if _target(fd).startswith(spool))


def _target(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:  # closed meanwhile
        return ""


def _wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_client_gone_mid_upload_stores_nothing_and_leaves_nothing_open(api: Api) -> None:
    before = count_rows(api)
    lines = jsonl([batch_line(f"g{i}", api.model) for i in range(400)])
    body, headers = multipart([("purpose", None, b"batch"), ("file", "gone.jsonl", lines)])
    url = urlsplit(api.url)
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: {headers['content-type']}\r\n"
        f"Content-Length: {len(body)}\r\n{api.auth_line.decode()}\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head + body[: len(body) // 2])
        _wait_until(lambda: _busy_uploads(api) == 1, "the upload never started")
    # The client is gone: the server must let go of everything it held for the upload.
    _wait_until(lambda: _busy_uploads(api) == 0, "the aborted upload was never cleaned up")
    assert count_rows(api) == before
    assert api.upload(jsonl([batch_line("after", api.model)])).status_code == 200
    assert count_rows(api)[0] == before[0] + 1
