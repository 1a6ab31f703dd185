"""Real vLLM through the whole stack: API + Redis + worker (SLUICE_ENGINE=vllm) as processes.

One stack for the module (one vLLM load) and one raw `LLM.generate` reference run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import create_engine, select

from sluice.models import requests
from tests.e2e.conftest import Running, start_stack
from tests.vllm.conftest import SETTINGS

MODEL = "tiny"
ROOT = Path(__file__).resolve().parents[2]
# Greedy, seeded and stop-string requests, each compared with raw vLLM on the same parameters.
CASES: list[dict[str, Any]] = [
    {"prompt": "The cat sees the dog.", "max_tokens": 12, "temperature": 0},
    {"prompt": "Where is the river today?", "max_tokens": 20, "temperature": 0},
    {"prompt": "Hi", "max_tokens": 6, "temperature": 0},
    {"prompt": "The old stone house", "max_tokens": 16, "temperature": 0.9, "seed": 7},
    {"prompt": "A quick red bird", "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 11},
    {"prompt": "The cat sees the dog.", "max_tokens": 24, "temperature": 0, "ignore_eos": True},
]


def env(model: Path) -> dict[str, str]:
    return {f"SLUICE_{k.upper()}": v for k, v in {**SETTINGS, "model": str(model)}.items()}


@pytest.fixture(scope="module")
def sluice(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """SQLite + embedded Redis; the worker runs vLLM; 2 slots and 32 requests in flight."""
    yield from start_stack(
        "sqlite",
        tmp_path_factory.mktemp("vllm") / "data",
        SLUICE_ENGINE="vllm",
        SLUICE_INFLIGHT_FACTOR="16",
        **env(tiny_model),
    )


def vllm_sampling(case: dict[str, Any]) -> dict[str, Any]:
    keys = ("max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos")
    return {k: case[k] for k in keys if k in case}


def reference(
    model: Path, cases: list[dict[str, Any]], workdir: Path, **extra_env: str
) -> list[dict[str, Any]]:
    """Raw LLM.generate on the cases (LLM.embed on {input} items), in its own process with the
    worker's settings."""
    src, dst = workdir / "cases.json", workdir / "out.json"
    items = [c if "input" in c else {"prompt": c["prompt"], "sampling": vllm_sampling(c)}
             for c in cases]  # fmt: skip
    src.write_text(json.dumps(items))
    subprocess.run(
        [sys.executable, "-m", "tests.vllm.reference", str(src), str(dst)],
        cwd=ROOT,
        env={**psutil.Process().environ(), **env(model), **extra_env},
        check=True,
        timeout=600,
    )
    out: list[dict[str, Any]] = json.loads(dst.read_text())
    return out


def line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": MODEL, **body},
    }


def rows(sluice: Running, batch_id: str) -> dict[str, Any]:
    db = create_engine(sluice.settings.resolved_database_url)
    with db.connect() as conn:
        found = conn.execute(
            select(requests.c.custom_id, requests.c.started_at, requests.c.finished_at).where(
                requests.c.batch_id == batch_id
            )
        ).all()
    db.dispose()
    return {r.custom_id: r for r in found}


def test_openai_batch_matches_raw_vllm_token_for_token(
    sluice: Running, tiny_model: Path, tmp_path: Path
) -> None:
    from openai import OpenAI

    expected = reference(tiny_model, CASES, tmp_path)
    # A stop string cut from what raw vLLM generates: the word after its first few tokens.
    greedy_text = expected[1]["text"]
    stop = next(w for w in greedy_text.split()[1:] if w.isalnum())
    stop_case = {**CASES[1], "stop": [stop]}
    (stop_expected,) = reference(tiny_model, [stop_case], tmp_path)
    lines = [line(f"c{i}", c) for i, c in enumerate(CASES)]
    lines.append(line("stop", stop_case))
    lines.append(line("too-long", {"prompt": "owl " * 600, "max_tokens": 4}))
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))

    client = OpenAI(base_url=f"{sluice.stack.url}/v1", api_key=sluice.stack.api_key, max_retries=0)
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(CASES) + 1, 1)
    assert batch.output_file_id and batch.error_file_id
    out = {
        x["custom_id"]: x["response"]["body"]
        for x in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())
    }
    for i, want in enumerate([*expected, stop_expected]):
        got = out["stop" if i == len(CASES) else f"c{i}"]
        choice, usage = got["choices"][0], got["usage"]
        assert choice["text"] == want["text"], (i, CASES[i] if i < len(CASES) else stop_case)
        assert usage["prompt_tokens"] == want["prompt_tokens"]
        assert usage["completion_tokens"] == want["completion_tokens"]
        assert choice["finish_reason"] == want["finish_reason"]
    assert stop not in out["stop"]["choices"][0]["text"]
    assert out["stop"]["choices"][0]["finish_reason"] == "stop"
    (err,) = map(json.loads, client.files.content(batch.error_file_id).text.splitlines())
    assert err["custom_id"] == "too-long"
    assert err["response"]["body"]["error"]["code"] == "context_length_exceeded"


def submit_long(sluice: Running, n: int, max_tokens: int) -> str:
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    lines = [line(f"r{i}", {"prompt": f"Story {i}:", **body}) for i in range(n)]
    return sluice.submit_file(lines, "/v1/completions")


def test_interactive_job_jumps_the_bulk_queued_in_vllm(sluice: Running) -> None:
    # 80 x 400 tokens, 32 in flight: on 2 quiet cores the tiny model decodes ~1,300 tokens/s
    # (a wave of 2 takes ~0.6 s), and with vLLM's CPU threads busy the job's POST took 7 s and
    # its hand-over to vLLM seconds more in CI; with 14 waiting in vLLM's queue only 2-4 were
    # then left to overtake. 30 waiting leave a margin of many waves.
    batch_id = submit_long(sluice, 80, 400)
    # 32 claimed (2 running, 30 waiting in vLLM's queue) before the job arrives.
    sluice.wait_for(
        lambda: sum(r.started_at is not None for r in rows(sluice, batch_id).values()) >= 32
    )
    r = sluice.http.post(
        "/v1/jobs", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4, "temperature": 0}
    )
    job_id = r.json()["id"]  # a job is a batch of one
    deadline = time.monotonic() + 180
    while (job := sluice.http.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json())[
        "status"
    ] not in ("succeeded", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, job
    assert job["status"] == "succeeded", job
    sluice.wait_batch(batch_id, timeout=300)
    job_row = next(iter(rows(sluice, job_id).values()))
    bulk = rows(sluice, batch_id).values()
    ahead = [b for b in bulk if b.started_at < job_row.started_at]
    overtaken = [b for b in ahead if b.finished_at > job_row.finished_at]
    # vLLM's priority scheduler runs the job at the next free slot; first-come-first-served
    # would make it wait behind every bulk request queued in vLLM before it (then <= 2).
    assert len(ahead) >= 32
    assert len(overtaken) >= 8, (len(ahead), len(overtaken))


def test_cancel_aborts_requests_in_the_engine(sluice: Running) -> None:
    # 60 x 480 tokens (~20 s on 2 quiet cores): 20 ended before a cancel POST delayed by busy
    # CPUs arrived ("completed and cannot be cancelled").
    batch_id = submit_long(sluice, 60, 480)
    start = time.monotonic()
    sluice.wait_for(
        lambda: any(r.finished_at is not None for r in rows(sluice, batch_id).values()),
        timeout=120,
    )
    one_wave = time.monotonic() - start  # one 480-token generation (2 at a time)
    r = sluice.http.post(f"/v1/batches/{batch_id}/cancel")
    assert r.status_code == 200, r.text
    cancelled_at = time.monotonic()
    done = sluice.wait_batch(batch_id, timeout=300)
    took = time.monotonic() - cancelled_at
    assert done["status"] == "cancelled"
    # Left to finish, the ~30 requests in vLLM would take ~15 more waves.
    assert took < 2 * one_wave + 5, (took, one_wave)
    errors = sluice.lines(done["error_file_id"])
    assert {x["error"]["code"] for x in errors} == {"batch_cancelled"}
    by_id = rows(sluice, batch_id)
    in_engine = [x for x in errors if by_id[x["custom_id"]].started_at is not None]
    assert len(in_engine) >= 2


def test_stopping_the_worker_leaves_no_vllm_process(sluice: Running) -> None:
    worker = next(p for n, p in zip(sluice.stack.names, sluice.stack.procs, strict=True)
                  if "worker" in n)  # fmt: skip
    engine_procs = psutil.Process(worker.pid).children(recursive=True)
    assert engine_procs, "vLLM's engine core runs in child processes of the worker"
    sluice.stack.stop()
    deadline = time.monotonic() + 30
    while alive := [p for p in engine_procs if p.is_running() and p.status() != "zombie"]:
        assert time.monotonic() < deadline, f"left behind: {alive}"
        time.sleep(0.1)
