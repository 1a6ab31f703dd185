"""vLLM's engine core killed mid-run: the worker exits non-zero in bounded time, its rows go
back to the queue, no vLLM process is left behind, and the restarted worker finishes the file."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import Running, start_stack
from tests.faults.conftest import rows_of, supervised
from tests.vllm.test_stack import env
from worker.runner import EXIT_RUNNER_FAILED

N = 40
# Long enough that most of the file is still in vLLM when its engine core is killed: the tiny
# model decodes ~1,300 tokens/s on 2 quiet cores (40 x 48 tokens took 1.5 s and the kill found
# the engine idle), far less on busy ones.
TOKENS = 400


@pytest.fixture(scope="module")
def sluice(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """SQLite + embedded Redis; the vLLM worker is supervised (restarted when it exits)."""
    yield from start_stack(
        "sqlite",
        tmp_path_factory.mktemp("vllm-crash") / "data",
        SLUICE_ENGINE="vllm",
        SLUICE_INFLIGHT_FACTOR="8",
        SLUICE_RECONCILE_INTERVAL="0.5",
        **env(tiny_model),
    )


def test_engine_core_killed_mid_run(sluice: Running) -> None:
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny", "prompt": f"Request number {i} says", "max_tokens": TOKENS,
                  "temperature": 0, "ignore_eos": True}}
        for i in range(N)
    ]  # fmt: skip
    batch_id = sluice.submit_file(lines, "/v1/completions")
    with supervised(sluice), rows_of(sluice, batch_id) as rows:
        worker = sluice.stack.procs[sluice.stack.names.index("worker")]
        # Generous: vLLM loads the model first (~40 s on 2 idle cores, minutes on busy ones).
        sluice.wait_for(lambda: rows.count("succeeded") >= 2, timeout=240)
        engine_procs = psutil.Process(worker.pid).children(recursive=True)
        assert engine_procs, "vLLM's engine core runs in child processes of the worker"
        for p in engine_procs:
            p.kill()
        killed_at = time.monotonic()
        # The runner sees the dead engine, releases its rows and exits 70, in bounded time.
        sluice.wait_for(lambda: worker.poll() is not None, timeout=60)
        assert worker.returncode == EXIT_RUNNER_FAILED
        assert time.monotonic() - killed_at < 60
        assert rows.count("running") == 0
        done = sluice.wait_batch(batch_id, timeout=300)
        # The requests that were in vLLM when it died were charged one crash, no more.
        charged = [r.crashes for r in rows.all() if r.crashes]
        assert charged and max(charged) == 1, charged
        # The restarted worker is idle now: no step() will raise, yet its watchdog notices
        # a dead engine core and the worker exits (still supervised: PR_SET_PDEATHSIG stops
        # the children a supervisor thread started once that thread returns).
        idle = sluice.stack.procs[sluice.stack.names.index("worker")]
        assert idle.pid != worker.pid and idle.poll() is None
        idle_engine = psutil.Process(idle.pid).children(recursive=True)
        assert idle_engine
        for p in idle_engine:
            p.kill()
        sluice.wait_for(lambda: idle.poll() is not None, timeout=60)
        assert idle.returncode == EXIT_RUNNER_FAILED
    assert done["request_counts"] == {"total": N, "completed": N, "failed": 0}
    out = sluice.lines(done["output_file_id"])
    assert sorted(x["custom_id"] for x in out) == sorted(f"c{i}" for i in range(N))
    assert all(x["response"]["body"]["usage"]["completion_tokens"] == TOKENS for x in out)
    # Nothing of the first worker's vLLM survives it.
    alive = [p for p in engine_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
