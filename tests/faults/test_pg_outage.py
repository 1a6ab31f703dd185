"""PostgreSQL stopped for 20 s mid-run under the whole supervised stack (API + sim worker).

The cluster is the test's own (initdb in a temporary directory, free port), stopped with
`pg_ctl stop -m fast` and started again on the same port and data directory. During the window
every API answer is a success or a 503 with Retry-After, on one keep-alive connection that is
never dropped; afterwards the batch and the jobs finish, nothing lost or repeated, and the
worker that lived through the outage is the one that finishes (never restarted).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from sluice.config import load_settings
from sluice.stack import Stack, free_port
from tests.e2e.conftest import Running
from tests.faults.conftest import SIM_ENV, completion_lines, rows_of, submit, supervised
from tests.servers import PgCluster, pg_cluster

N = 5000
OUTAGE_SECONDS = 20.0
UNFINISHED = ("queued", "running", "in_progress", "validating", "finalizing")


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of this test's own."""
    with pg_cluster() as running:
        yield running


@pytest.fixture
def pg_stack(cluster: PgCluster, tmp_path: Path) -> Iterator[Running]:
    """API + sim worker on the test's cluster and the stack's embedded Redis."""
    settings = load_settings(data_dir=tmp_path, database_url=cluster.url)
    env = {**SIM_ENV, "SLUICE_MAX_NUM_SEQS": "16"}
    stack = Stack(settings, "127.0.0.1", free_port(), env=env, quiet=True)
    try:
        stack.start()
        with httpx.Client(base_url=stack.url, timeout=60, headers=stack.auth_headers) as http:
            yield Running(stack, settings, http, redis.Redis.from_url(stack.redis.url), "postgres")
    finally:
        stack.stop()


def _log(sluice: Running, name: str, lines: int = 40) -> str:
    """The tail of a child's log (quiet mode writes DATA_DIR/<name>.log)."""
    path = Path(sluice.settings.data_dir) / f"{name}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _stream(response: httpx.Response) -> int:
    # The same object across answers: the keep-alive connection was never closed.
    return id(response.extensions["network_stream"])


def _check(response: httpx.Response, what: str) -> None:
    """A success, or a 503 with Retry-After in the OpenAI error shape."""
    if response.status_code < 300:
        return
    assert response.status_code == 503, (what, response.status_code, response.text)
    assert int(response.headers["retry-after"]) > 0, what
    assert response.json()["error"]["code"] == "service_unavailable", (what, response.text)


def _post_job(http: httpx.Client, prompt: str) -> httpx.Response:
    return http.post("/v1/jobs", json={"prompt": prompt, "max_tokens": 4})


def _wait_job(sluice: Running, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (job := sluice.http.get(f"/v1/jobs/{job_id}").json())["status"] in UNFINISHED:
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


def test_database_stopped_20s_mid_run(pg_stack: Running, cluster: PgCluster) -> None:
    sluice = pg_stack
    names = sluice.stack.names
    with supervised(sluice):
        children = {name: sluice.stack.children[names.index(name)] for name in ("api", "worker")}
        worker = children["worker"].proc
        batch_id = submit(sluice, completion_lines(N))
        before = _post_job(sluice.http, "before the outage")
        assert before.status_code == 202, before.text
        jobs = [before.json()["id"]]
        with rows_of(sluice, batch_id) as rows:
            sluice.wait_for(lambda: rows.count("succeeded") >= N // 10, timeout=120)
        cluster.stop()
        answers: dict[str, dict[int, int]] = {}
        streams: set[int] = set()
        try:
            with httpx.Client(
                base_url=sluice.stack.url, timeout=30, headers=sluice.stack.auth_headers
            ) as http:
                deadline = time.monotonic() + OUTAGE_SECONDS
                while time.monotonic() < deadline:
                    calls = [
                        ("GET batch", lambda: http.get(f"/v1/batches/{batch_id}")),
                        ("POST job", lambda: _post_job(http, "during the outage")),
                        ("GET readyz", lambda: http.get("/readyz")),
                        ("GET files", lambda: http.get("/v1/files")),
                    ]
                    for what, call in calls:
                        try:
                            response = call()
                        except httpx.TransportError as exc:
                            raise AssertionError(
                                f"{what}: the connection failed ({exc!r})\n{_log(sluice, 'api')}"
                            ) from exc
                        _check(response, what)
                        streams.add(_stream(response))
                        seen = answers.setdefault(what, {})
                        seen[response.status_code] = seen.get(response.status_code, 0) + 1
                        if what == "POST job" and response.status_code == 202:
                            jobs.append(response.json()["id"])
                    time.sleep(0.05)  # pacing: about 60 rounds, not a busy loop on 2 cores
        finally:
            cluster.start()
        # The outage was seen: the database reads answered 503 (this is not a run that ended
        # before the stop), and never over a second connection.
        for what in ("GET batch", "GET readyz", "GET files"):
            assert answers[what].get(503, 0) > 0, answers
        assert len(streams) == 1, "a keep-alive connection was closed during the outage"
        # Fail fast (rather than after a 600 s lease) when the outage killed the worker.
        assert children["worker"].proc is worker and worker.poll() is None, _log(sluice, "worker")
        after = _post_job(sluice.http, "after the outage")
        assert after.status_code == 202, after.text
        jobs.append(after.json()["id"])

        done = sluice.wait_batch(batch_id, timeout=240)
        assert done["request_counts"] == {"total": N, "completed": N, "failed": 0}, done
        ids = [line["custom_id"] for line in sluice.lines(done["output_file_id"])]
        assert len(ids) == N and set(ids) == {f"r{i}" for i in range(N)}
        assert sluice.lines(done.get("error_file_id")) == []
        for job_id in jobs:
            assert _wait_job(sluice, job_id)["status"] == "succeeded"
        with rows_of(sluice, batch_id) as rows:
            assert {r.status for r in rows.all()} == {"succeeded"}

        # Never restarted: the same worker (and API) processes, alive, no supervised restart.
        log = _log(sluice, "worker", 200)
        assert children["worker"].proc is worker and worker.poll() is None, log
        assert all(c.restarts == 0 and c.proc.poll() is None for c in children.values()), log
        assert "database unavailable" in (Path(sluice.settings.data_dir) / "worker.log").read_text()
