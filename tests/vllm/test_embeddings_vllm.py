"""/v1/embeddings on real vLLM (its pooling runner on the tiny Llama) through the whole stack,
compared with raw `LLM.embed` on the same model and settings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import BadRequestError, OpenAI
from openai.types import CreateEmbeddingResponse

from tests.e2e.conftest import Running, start_stack
from tests.vllm.test_stack import MODEL, env, reference

TEXTS = ["The cat sees the dog.", "Where is the river today?", "Hi", "The old stone house"]
# vLLM pools in float32 either way; batching may change the last bits of a sum.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sluice(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """SQLite + embedded Redis; the worker runs vLLM's pooling runner."""
    yield from start_stack(
        "sqlite",
        tmp_path_factory.mktemp("vllm-embed") / "data",
        SLUICE_ENGINE="vllm",
        SLUICE_TASK="embed",
        **env(tiny_model),
    )


@pytest.fixture(scope="module")
def expected(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Raw LLM.embed of TEXTS (in its own process, the worker's settings)."""
    workdir = tmp_path_factory.mktemp("embed-ref")
    return reference(tiny_model, [{"input": t} for t in TEXTS], workdir, SLUICE_TASK="embed")


def close(got: list[float], want: list[float]) -> bool:
    if len(got) != len(want):
        return False
    return all(abs(a - b) <= TOLERANCE for a, b in zip(got, want, strict=True))


def test_online_embeddings_equal_raw_vllm(sluice: Running, expected: list[dict[str, Any]]) -> None:
    client = OpenAI(base_url=f"{sluice.stack.url}/v1", api_key=sluice.stack.api_key, max_retries=0)
    got = client.embeddings.create(model=MODEL, input=TEXTS)  # base64, decoded by the client
    assert isinstance(got, CreateEmbeddingResponse)
    for item, want in zip(got.data, expected, strict=True):
        assert close(item.embedding, want["embedding"]), item.index
    assert got.usage.prompt_tokens == sum(w["prompt_tokens"] for w in expected)
    floats = client.embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="float")
    assert close(floats.data[0].embedding, expected[1]["embedding"])
    with pytest.raises(BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert err.value.body["param"] == "endpoint"  # type: ignore[index]


def test_a_batch_of_embeddings_with_bad_lines_failing_alone(
    sluice: Running, expected: list[dict[str, Any]]
) -> None:
    def line(custom_id: str, value: Any) -> dict[str, Any]:
        body = {"model": MODEL, "input": value, "encoding_format": "float"}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}

    lines = [line(f"e{i}", text) for i, text in enumerate(TEXTS)]
    lines.append(line("too-long", "owl " * 600))  # over the 512-token context
    lines.append(line("out-of-vocab", [[1, 5], [1, 10**7]]))  # vLLM refuses the token id
    batch = sluice.run_file(
        lines,
        "/v1/embeddings",
    )
    assert batch["status"] == "completed", batch
    counts = batch["request_counts"]
    assert (counts["completed"], counts["failed"]) == (len(TEXTS), 2), counts
    out = {x["custom_id"]: x["response"]["body"] for x in sluice.lines(batch["output_file_id"])}
    for i, want in enumerate(expected):
        body = CreateEmbeddingResponse.model_validate(out[f"e{i}"])
        assert close(body.data[0].embedding, want["embedding"]), i
        assert body.usage.prompt_tokens == want["prompt_tokens"]
    errors = {x["custom_id"]: x["response"]["body"]["error"]
              for x in sluice.lines(batch["error_file_id"])}  # fmt: skip
    assert errors["too-long"]["code"] == "context_length_exceeded"
    assert "out of vocabulary" in errors["out-of-vocab"]["message"], errors
    assert json.dumps(errors)  # every error is plain JSON
