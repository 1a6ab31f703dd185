"""A real model (the tiny random Llama on transformers) served through the whole stack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Running, start_stack

pytest.importorskip("torch", reason="the hf engine needs the [hf] extra (torch)")
pytest.importorskip("transformers", reason="the hf engine needs the [hf] extra")


@pytest.fixture(scope="module")
def sluice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """SQLite + embedded Redis, hf engine on a freshly built tiny model."""
    from sluice.tiny_model import build_tiny_model

    root = Path(tmp_path_factory.mktemp("hf"))
    model = build_tiny_model(root / "tiny")
    yield from start_stack(
        "sqlite",
        root / "data",
        SLUICE_ENGINE="hf",
        SLUICE_MODEL=str(model),
        SLUICE_MODEL_NAME="tiny",
        SLUICE_MAX_NUM_SEQS="8",
        SLUICE_DEVICE="cpu",
    )


def test_chat_batch_on_a_real_model(sluice: Running) -> None:
    lines: list[dict[str, object]] = [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "max_tokens": 6,
                "temperature": 0,
                "messages": [{"role": "user", "content": f"tell me about owls {i}"}],
            },
        }
        for i in range(10)
    ]
    lines.append(
        {
            "custom_id": "too-long",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "max_tokens": 6,
                "messages": [{"role": "user", "content": "owl " * 2000}],
            },
        }
    )
    batch = sluice.run_file(lines, "/v1/chat/completions")
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 11, "completed": 10, "failed": 1}
    out = sluice.lines(batch["output_file_id"])
    assert sorted(x["custom_id"] for x in out) == sorted(f"q{i}" for i in range(10))
    for x in out:
        body = x["response"]["body"]
        usage = body["usage"]
        # The chat template wraps the message, so the prompt has more tokens than its words.
        assert usage["prompt_tokens"] > 5 and 1 <= usage["completion_tokens"] <= 6
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
    (err,) = sluice.lines(batch["error_file_id"])
    assert err["custom_id"] == "too-long"
    assert err["response"]["body"]["error"]["code"] == "context_length_exceeded"


def test_single_job_is_deterministic_at_temperature_zero(sluice: Running) -> None:
    outs = []
    for _ in range(2):
        r = sluice.http.post(
            "/v1/jobs",
            json={"model": "tiny", "prompt": "the river", "max_tokens": 5, "temperature": 0},
        )
        outs.append(sluice.http.get(f"/v1/jobs/{r.json()['id']}", params={"wait": 60}).json())
    assert outs[0]["status"] == outs[1]["status"] == "succeeded"
    assert outs[0]["output"] == outs[1]["output"] and outs[0]["output"]
