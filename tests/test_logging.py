"""Structured logs: JSON lines with batch and request ids when configured; prompts never."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from sluice.logs import JsonFormatter, log_context, prompt_text, setup_logging
from sluice.stack import free_port

MARKER = "zebra-quokka-secret-prompt"


def test_json_lines_carry_ids_from_extra_and_context() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("sluice.test.logs")
    log.addHandler(handler)
    log.propagate = False
    try:
        with log_context(batch_id="batch_1"):
            log.warning("claimed %d", 3, extra={"request_ids": [7, 8, 9]})
        log.warning("outside")
    finally:
        log.removeHandler(handler)
    first, second = (json.loads(x) for x in stream.getvalue().splitlines())
    assert first["message"] == "claimed 3" and first["level"] == "WARNING"
    assert first["batch_id"] == "batch_1" and first["request_ids"] == [7, 8, 9]
    assert "batch_id" not in second


def test_prompts_hidden_unless_allowed() -> None:
    try:
        setup_logging("text", "INFO", log_prompts=False)
        assert MARKER not in prompt_text(MARKER) and "26 characters" in prompt_text(MARKER)
        setup_logging("text", "INFO", log_prompts=True)
        assert prompt_text(MARKER) == MARKER
    finally:
        setup_logging("text", "INFO", log_prompts=False)


def test_sluice_up_logs_json_with_batch_ids_and_no_prompts(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update(
        SLUICE_DATA_DIR=str(tmp_path),
        SLUICE_ENGINE="echo",
        SLUICE_FLOWER="false",
        SLUICE_AUTH="off",
        SLUICE_LOG_FORMAT="json",
    )
    err = (tmp_path / "stderr.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Sluice is up at" in line:
                break
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            timeout=30,
            headers={"Authorization": "Bearer sluice"},
        )
        body = "".join(
            json.dumps(
                {
                    "custom_id": f"c{i}",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {"model": "sluice-echo", "prompt": f"{MARKER} {i}", "max_tokens": 4},
                }
            )
            + "\n"
            for i in range(20)
        )
        f = http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", body)})
        batch = http.post(
            "/v1/batches",
            json={
                "input_file_id": f.json()["id"],
                "endpoint": "/v1/completions",
                "completion_window": "24h",
            },
        ).json()
        deadline = time.monotonic() + 60
        while http.get(f"/v1/batches/{batch['id']}").json()["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        psutil.wait_procs(children, timeout=30)
        err.close()
    text = (tmp_path / "stderr.log").read_text()
    records = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    assert records, text[:2000]
    # Every line our processes log is a JSON object (the worker banner is off too).
    others = [x for x in text.splitlines() if x.strip() and not x.startswith("{")]
    # (what is left is what `sluice up` says to the person at the terminal)
    assert not [x for x in others if re.match(r"\d{4}-\d\d-\d\d |\[[IWE] |Traceback", x)], others
    mine = [r for r in records if r.get("batch_id") == batch["id"]]
    assert mine and all("request_ids" in r for r in mine), records[-5:]
    assert MARKER not in text
    for path in tmp_path.glob("*.log"):
        assert MARKER not in path.read_text(errors="replace"), path
