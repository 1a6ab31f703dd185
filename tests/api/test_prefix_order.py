"""Prefix-aware order over real HTTP: request ids group lines sharing a prompt prefix, output
files stay in line order, cached prompt tokens are stored, summed and rendered."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final

import pytest
from sqlalchemy import select

from sluice.models import requests
from sluice.prefix import MAX_KEY_BYTES, MAX_TEXT_BYTES, prefix_key, prompt_text
from sluice.store.work import Result, claim, write_results
from tests.api.helpers import Api, jsonl

CHAT: Final = "/v1/chat/completions"
COMPLETIONS: Final = "/v1/completions"
DOCS, QUESTIONS = 6, 5
# Lines carry 2-7 kB of document and instructions.
LIMITS: Final = {"max_line_bytes": 64 * 1024, "max_file_bytes": 4 * 1024 * 1024}


@pytest.fixture(scope="module")
def api(start_api: Callable[..., AbstractContextManager[Api]]) -> Iterator[Api]:
    """This module's API: the test defaults, with room for long lines."""
    with start_api(**LIMITS) as running:
        yield running


def document(d: int, size: int = 2000) -> str:
    """A long text that differs from every other document from its first word on."""
    words = [f"doc{d}-w{i}" for i in range(size // 8)]
    return " ".join(words)[:size]


def docs_x_questions(
    model: str, endpoint: str, system: str | None = None, seed: int = 7
) -> list[dict[str, Any]]:
    """DOCS documents x QUESTIONS questions each, shuffled; custom_id 'd{doc}-q{question}'."""
    lines = []
    for d in range(DOCS):
        for q in range(QUESTIONS):
            text = f"{document(d)}\n\nQuestion {q}: what does word {q * 7} say?"
            if endpoint == CHAT:
                messages = [{"role": "user", "content": text}]
                if system is not None:
                    messages.insert(0, {"role": "system", "content": system})
                body: dict[str, Any] = {"model": model, "messages": messages}
            else:
                body = {"model": model, "prompt": (system or "") + text}
            lines.append({"custom_id": f"d{d}-q{q}", "method": "POST", "url": endpoint,
                          "body": body})  # fmt: skip
    random.Random(seed).shuffle(lines)
    return lines


def doc_of(custom_id: str) -> int:
    return int(custom_id.split("-")[0][1:])


def runs(values: Sequence[Any]) -> int:
    """How many stretches of equal neighbours a sequence has."""
    return sum(1 for i, v in enumerate(values) if i == 0 or values[i - 1] != v)


def submit(api: Api, lines: Sequence[dict[str, Any]], endpoint: str) -> tuple[str, list[int]]:
    """Upload and create a batch; returns its id and the request ids its messages named."""
    before = len(api.queued_ids())
    f = api.upload(jsonl(lines))
    assert f.status_code == 200, f.text
    b = api.http.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": endpoint})
    assert b.status_code == 200, b.text
    assert b.json()["status"] == "in_progress", b.json()["errors"]
    named = [rid for message in api.queued_ids()[before:] for rid in message]
    return str(b.json()["id"]), named


def queued_order(api: Api, batch_id: str) -> list[tuple[int, str, int]]:
    """(id, custom_id, line_no) of a batch's requests, by id: the order workers claim them."""
    with api.db.read() as conn:
        rows = conn.execute(
            select(requests.c.id, requests.c.custom_id, requests.c.line_no)
            .where(requests.c.batch_id == batch_id)
            .order_by(requests.c.id)
        ).all()
    return [(r.id, r.custom_id, r.line_no) for r in rows]


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS])
def test_shuffled_documents_queue_grouped_in_order_of_first_appearance(
    api: Api, endpoint: str
) -> None:
    lines = docs_x_questions(api.model, endpoint)
    batch_id, named = submit(api, lines, endpoint)
    order = queued_order(api, batch_id)
    assert named == [rid for rid, _, _ in order]  # messages name ids in id order
    docs = [doc_of(cid) for _, cid, _ in order]
    assert runs(docs) == DOCS, docs  # each document's questions are one stretch
    # Groups come in the order their documents first appear in the file.
    first_seen = list(dict.fromkeys(doc_of(x["custom_id"]) for x in lines))
    assert list(dict.fromkeys(docs)) == first_seen
    assert sorted(line for _, _, line in order) == list(range(1, len(lines) + 1))


def test_documents_group_behind_a_long_shared_system_prompt(api: Api) -> None:
    # 5 kB of shared instructions first: grouping must look past them (levels up to 64 KiB).
    system = "Follow these rules carefully. " * 170
    lines = docs_x_questions(api.model, CHAT, system=system, seed=11)
    batch_id, _ = submit(api, lines, CHAT)
    docs = [doc_of(cid) for _, cid, _ in queued_order(api, batch_id)]
    assert runs(docs) == DOCS, docs


def test_lines_without_shared_prefixes_keep_line_order(api: Api) -> None:
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": CHAT,
         "body": {"model": api.model, "messages": [{"role": "user", "content": f"hi {i}"}]}}
        for i in range(40)
    ]  # fmt: skip
    batch_id, _ = submit(api, lines, CHAT)
    assert [line for _, _, line in queued_order(api, batch_id)] == list(range(1, 41))


def test_prefix_order_off_keeps_arrival_order(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    with start_api(prefix_order=False, **LIMITS) as api:
        lines = docs_x_questions(api.model, CHAT)
        batch_id, _ = submit(api, lines, CHAT)
        order = queued_order(api, batch_id)
    assert [cid for _, cid, _ in order] == [x["custom_id"] for x in lines]
    assert runs([doc_of(cid) for _, cid, _ in order]) > 2 * DOCS  # the file's shuffle


def test_prefix_key_follows_the_text_block_by_block() -> None:
    base = "x" * 5000
    key = prefix_key(base)
    assert len(key) == 4 * 20  # one CRC per started 256-byte block
    # Differing at byte 3000: the first 11 blocks agree, the rest do not.
    other = prefix_key(base[:3000] + "y" + base[3001:])
    assert other[:44] == key[:44]
    assert all(other[i : i + 4] != key[i : i + 4] for i in range(44, len(key), 4))
    assert prefix_key(base[:3000])[:44] == key[:44]  # a line that is another's prefix
    # The role is part of what a chat template writes first.
    as_user = prompt_text(None, [{"role": "user", "content": "a"}])
    as_system = prompt_text(None, [{"role": "system", "content": "a"}])
    assert prefix_key(as_user) != prefix_key(as_system)
    # Past 64 KiB nothing is keyed.
    assert prompt_text("p" * 100_000, None) == "p" * MAX_TEXT_BYTES
    assert len(prefix_key("é" * 100_000)) == MAX_KEY_BYTES


@pytest.fixture
def held(api: Api) -> Iterator[tuple[str, list[dict[str, Any]], dict[str, int]]]:
    """A queued docs x questions batch, every request claimed by 'test-worker'."""
    lines = docs_x_questions(api.model, CHAT, seed=3)
    batch_id, named = submit(api, lines, CHAT)
    claimed = claim(api.db, named, "test-worker", 60)
    assert len(claimed) == len(named)
    ids = {cid: rid for rid, cid, _ in queued_order(api, batch_id)}
    yield batch_id, lines, ids


def test_cached_tokens_are_stored_summed_and_rendered(
    api: Api, held: tuple[str, list[dict[str, Any]], dict[str, int]]
) -> None:
    batch_id, lines, ids = held
    # The first question of each document computes it; the others find it cached.
    cached = {cid: (0 if cid.endswith("-q0") else 480 + doc_of(cid)) for cid in ids}

    def result(cid: str) -> Result:
        return Result(id=ids[cid], status="succeeded", output_text=f"out {cid}",
                      finish_reason="stop", prompt_tokens=520, completion_tokens=3,
                      finished_at=time.time(), cached_tokens=cached[cid])  # fmt: skip

    cids = sorted(ids, key=ids.__getitem__)
    # Two writes: the batch's counters add up across them.
    write_results(api.db, "test-worker", [result(c) for c in cids[:11]])
    mid = api.http.get(f"/v1/batches/{batch_id}").json()
    assert mid["usage"]["input_tokens_details"]["cached_tokens"] == sum(
        cached[c] for c in cids[:11]
    )
    write_results(api.db, "test-worker", [result(c) for c in cids[11:]])
    batch = api.http.get(f"/v1/batches/{batch_id}").json()
    assert batch["status"] == "completed"
    n = len(lines)
    assert batch["usage"] == {
        "input_tokens": 520 * n, "output_tokens": 3 * n, "total_tokens": 523 * n,
        "input_tokens_details": {"cached_tokens": sum(cached.values())},
        "output_tokens_details": {"reasoning_tokens": 0},
    }  # fmt: skip
    out = api.http.get(f"/v1/files/{batch['output_file_id']}/content")
    assert out.status_code == 200, out.text
    got = [json.loads(x) for x in out.content.splitlines()]
    # The output file follows the input file's lines, whatever order the requests ran in.
    assert [x["custom_id"] for x in got] == [x["custom_id"] for x in lines]
    for x in got:
        assert x["id"] == f"batch_req_{ids[x['custom_id']]}"
        assert x["response"]["body"]["usage"] == {
            "prompt_tokens": 520, "completion_tokens": 3, "total_tokens": 523,
            "prompt_tokens_details": {"cached_tokens": cached[x["custom_id"]]},
        }  # fmt: skip
