"""Streaming on real vLLM (in this process): DELTA outputs for streaming requests only, their
pieces joining to the same text a final-only request gets; an aborted stream frees its slot."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from sluice.sampling import Sampling
from tests.vllm.conftest import tiny_engine
from worker.engines.base import GenRequest, GenResult

if TYPE_CHECKING:
    from worker.engines.vllm_engine import VLLMEngine

PROMPT = "The canal lock raised the boat because"


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[VLLMEngine]:
    loaded = tiny_engine(tiny_model)
    yield loaded
    loaded.close()


def _request(engine: VLLMEngine, rid: int, stream: bool, max_tokens: int) -> GenRequest:
    sampling = Sampling(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = engine.tokenizer.encode(PROMPT)
    return GenRequest(rid, PROMPT, sampling, prompt_token_ids=ids, stream=stream)


def test_stream_pieces_join_to_the_final_text_and_abort_frees_the_slot(
    engine: VLLMEngine,
) -> None:
    engine.add(_request(engine, 1, stream=True, max_tokens=24))
    engine.add(_request(engine, 2, stream=False, max_tokens=24))
    pieces: dict[int, list[tuple[int, str]]] = {1: [], 2: []}
    results: dict[int, GenResult] = {}
    step = 0
    deadline = time.monotonic() + 120
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "the engine did not finish"
        finished = engine.step()
        step += 1
        for d in engine.take_deltas():
            assert d.id not in results, "a piece after its request finished"
            pieces[d.id].append((step, d.text))
        results.update((r.id, r) for r in finished)
    assert pieces[2] == []  # FINAL_ONLY: no per-step output for bulk requests
    streamed = "".join(text for _, text in pieces[1])
    assert streamed == results[1].text == results[2].text
    assert results[1].completion_tokens == results[2].completion_tokens == 24
    # Token by token, not one lump at the end.
    assert len({s for s, _ in pieces[1]}) >= 12, pieces[1]

    engine.add(_request(engine, 3, stream=True, max_tokens=400))
    got: list[str] = []
    while not got:
        assert time.monotonic() < deadline, "no piece arrived"
        assert engine.step() == []
        got += [d.text for d in engine.take_deltas()]
    assert engine.busy_slots() == 1
    engine.abort([3])
    assert engine.busy_slots() == 0
    aborted = [r for r in engine.step() if r.id == 3]
    assert [r.finish_reason for r in aborted] == ["abort"]
    assert not engine.has_unfinished()
    assert engine.take_deltas() == []
