"""/v1/embeddings through the whole stack (API and echo worker as processes, SLUICE_TASK=embed):
online with the official openai client (its default base64 and floats), batch files, jobs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import BadRequestError, OpenAI
from openai.types import CreateEmbeddingResponse

from tests.e2e.conftest import Running, start_stack
from worker.engines.echo import bag_of_tokens
from worker.engines.text import WordTokenizer

MODEL = "sluice-echo"
TEXTS = ["the river runs", "runs the river", "a quiet lock"]


def expected(text: str) -> list[float]:
    """Echo's vector of a text: its word ids' bag, unit length."""
    return bag_of_tokens(WordTokenizer().encode(text))


@pytest.fixture(scope="module")
def sluice(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A stack serving an embedding model (echo's bag of tokens)."""
    data = Path(tmp_path_factory.mktemp(f"embed-{backend}"))
    yield from start_stack(backend, data, SLUICE_ENGINE="echo", SLUICE_TASK="embed")


@pytest.fixture(scope="module")
def client(sluice: Running) -> OpenAI:
    """The official client, pointed at Sluice by base_url only."""
    return OpenAI(base_url=f"{sluice.stack.url}/v1", api_key=sluice.stack.api_key, max_retries=0)


def test_embeddings_with_the_official_client(client: OpenAI) -> None:
    # The client asks for base64 by default and decodes it: float32 of the engine's vectors.
    got = client.embeddings.create(model=MODEL, input=TEXTS)
    assert isinstance(got, CreateEmbeddingResponse) and got.model == MODEL
    assert [d.index for d in got.data] == [0, 1, 2]
    for item, text in zip(got.data, TEXTS, strict=True):
        assert item.embedding == pytest.approx(expected(text), abs=1e-7)
    assert got.data[0].embedding == got.data[1].embedding  # the same words
    assert (got.usage.prompt_tokens, got.usage.total_tokens) == (9, 9)
    floats = client.embeddings.create(model=MODEL, input=TEXTS[2], encoding_format="float")
    assert floats.data[0].embedding == expected(TEXTS[2])  # exactly: JSON floats
    ids = client.embeddings.create(model=MODEL, input=[[3, 19, 35]], encoding_format="float")
    assert ids.data[0].embedding == bag_of_tokens([3, 19, 35])


def test_generation_and_bad_input_are_refused_naming_the_field(client: OpenAI) -> None:
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["param"] == "endpoint"  # type: ignore[index]
    assert "embedding model" in err.value.body["message"]  # type: ignore[index]
    with pytest.raises(BadRequestError) as err:
        client.embeddings.create(model=MODEL, input=["ok", ""])
    assert err.value.body["param"] == "input[1]"  # type: ignore[index]
    with pytest.raises(BadRequestError) as err:
        client.embeddings.create(model=MODEL, input="x", dimensions=4)
    assert err.value.body["code"] == "unsupported_parameter"  # type: ignore[index]


def test_a_batch_file_of_embeddings(sluice: Running) -> None:
    lines = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": MODEL, "input": text}}
        for i, text in enumerate(TEXTS)
    ]  # fmt: skip
    batch = sluice.run_file(lines, "/v1/embeddings")
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3, batch
    out = {o["custom_id"]: o for o in sluice.lines(batch["output_file_id"])}
    for i, text in enumerate(TEXTS):
        body = CreateEmbeddingResponse.model_validate(out[f"e{i}"]["response"]["body"])
        assert body.data[0].embedding == expected(text)
    # A chat line in an embeddings file is that line's error, naming its url.
    chat = {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}}  # fmt: skip
    failed = sluice.run_file([lines[0], chat], "/v1/embeddings")
    assert failed["status"] == "failed"
    (error,) = failed["errors"]["data"]
    assert (error["line"], error["param"]) == (2, "url")


def test_a_job_with_input_carries_the_embeddings_list(sluice: Running) -> None:
    created = sluice.http.post("/v1/jobs", json={"input": TEXTS[0]})
    assert created.status_code == 202, created.text
    job = sluice.http.get(f"/v1/jobs/{created.json()['id']}", params={"wait": 30}).json()
    assert job["status"] == "succeeded", job
    body = CreateEmbeddingResponse.model_validate(job["response"])
    assert body.data[0].embedding == expected(TEXTS[0])
    prompt = sluice.http.post("/v1/jobs", json={"prompt": "x"})
    assert prompt.status_code == 400 and prompt.json()["error"]["param"] == "prompt"
