"""Real vLLM's prefix cache through the stack: questions about one document report cached
prompt tokens, per output line and summed in the batch's usage."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Running, start_stack
from tests.vllm.test_stack import env, line

DOCS, QUESTIONS = 3, 4
# vLLM's CPU backend caches blocks of 128 tokens; a document of 270-290 tokens (the tiny
# model's tokenizer) fills two, and with its question stays under the 512-token context.
BLOCK = 128
WORDS = ("quiet", "old", "red", "cold", "bright", "slow", "green", "tall")


def document(d: int) -> str:
    words = WORDS[d:] + WORDS[:d]
    return " ".join(f"Doc {d} line {i}: the {words[i % 8]} river." for i in range(20))


@pytest.fixture(scope="module")
def sluice(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """SQLite + embedded Redis; the worker runs vLLM with prefix caching (the default)."""
    yield from start_stack(
        "sqlite", tmp_path_factory.mktemp("vllm-prefix") / "data", SLUICE_ENGINE="vllm",
        **env(tiny_model),
    )  # fmt: skip


def test_questions_about_one_document_report_cached_prompt_tokens(sluice: Running) -> None:
    lines = [
        line(f"d{d}-q{q}", {"prompt": f"{document(d)}\nQuestion {q}: which river is {WORDS[q]}?",
                            "max_tokens": 4, "temperature": 0})
        for d in range(DOCS) for q in range(QUESTIONS)
    ]  # fmt: skip
    random.Random(5).shuffle(lines)
    batch = sluice.run_file(lines, "/v1/completions")
    assert batch["status"] == "completed", batch
    out = sluice.lines(batch["output_file_id"])
    assert [x["custom_id"] for x in out] == [x["custom_id"] for x in lines]
    usage: dict[str, Any] = {x["custom_id"]: x["response"]["body"]["usage"] for x in out}
    per_doc: dict[str, list[int]] = defaultdict(list)
    for custom_id, u in usage.items():
        assert BLOCK * 2 < u["prompt_tokens"] < 500, u
        cached = u["prompt_tokens_details"]["cached_tokens"]
        assert 0 <= cached < u["prompt_tokens"], u
        per_doc[custom_id.split("-")[0]].append(cached)
    # Each document is computed once; later questions about it find its blocks cached.
    for doc, cached in per_doc.items():
        assert max(cached) >= BLOCK, (doc, cached)
    total = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage.values())
    assert batch["usage"]["input_tokens_details"] == {"cached_tokens": total}
    assert batch["usage"]["input_tokens"] == sum(u["prompt_tokens"] for u in usage.values())
    print(json.dumps({"cached_tokens": total, "input_tokens": batch["usage"]["input_tokens"]}))
