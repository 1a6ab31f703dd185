"""Echo and sim engines: deterministic output, stops, priorities, aborts, slot occupancy."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from typing import Any

import pytest

from sluice.config import Settings, load_settings
from worker.engines import load_engine
from worker.engines.base import Engine, GenRequest, GenResult, Sampling
from worker.engines.echo import EchoEngine
from worker.engines.meter import OccupancyMeter
from worker.engines.sim import SimEngine, SimSettings
from worker.engines.text import apply_stop, count_words, render_chat

PROMPT = "one two three four five six seven eight nine ten"


def settings(**overrides: Any) -> Settings:
    return load_settings(**{"max_num_seqs": 4, "max_model_len": 4096, **overrides})


def sim(slots: int = 4, **timing: float) -> SimEngine:
    """A sim engine with `slots` and its own timing settings (zero unless given)."""
    zero = {"sim_decode_step": 0.0, "sim_decode_per_seq": 0.0, "sim_prefill_per_token": 0.0}
    return SimEngine(settings(max_num_seqs=slots), SimSettings.load(**{**zero, **timing}))


def req(rid: int, prompt: str = PROMPT, priority: int = 1, **sampling: Any) -> GenRequest:
    return GenRequest(id=rid, prompt=prompt, sampling=Sampling(**sampling), priority=priority)


def drain(engine: Engine, max_steps: int = 10_000) -> list[GenResult]:
    out: list[GenResult] = []
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return out
        out.extend(engine.step())
    raise AssertionError("engine did not finish")


# -- shared text helpers -------------------------------------------------------------


def test_whitespace_tokens_and_chat_template() -> None:
    assert count_words("") == 0
    assert count_words("   ") == 1
    assert count_words(" a  b\nc ") == 3
    rendered = render_chat(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
        ]
    )
    assert rendered == "<|system|>\nbe brief\n<|user|>\nhi there\n<|assistant|>\n"


def test_apply_stop_cuts_at_the_earliest_stop() -> None:
    assert apply_stop("a b c d", ["c", "b"]) == ("a ", True)
    assert apply_stop("a b c d", ["x"]) == ("a b c d", False)
    assert apply_stop("a b", []) == ("a b", False)


def test_load_engine_picks_by_name_without_torch() -> None:
    assert isinstance(load_engine(settings(engine="echo")), EchoEngine)
    assert isinstance(load_engine(settings(engine="sim")), SimEngine)
    # echo and sim workers must stay light: loading them never imports torch or vllm.
    code = (
        "import sys\n"
        "from sluice.config import Settings\n"
        "from worker.engines import load_engine\n"
        "load_engine(Settings(engine='echo')); load_engine(Settings(engine='sim'))\n"
        "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# -- echo ------------------------------------------------------------------------------


def test_echo_is_deterministic_and_truncates_to_max_tokens() -> None:
    runs = []
    for _ in range(2):
        engine = EchoEngine(settings())
        engine.add(req(1, max_tokens=3))
        engine.add(req(2, max_tokens=50))
        runs.append(drain(engine))
    assert runs[0] == runs[1]
    cut, whole = runs[0]
    assert (cut.text, cut.finish_reason, cut.completion_tokens) == ("one two three", "length", 3)
    assert (whole.text, whole.finish_reason, whole.completion_tokens) == (PROMPT, "stop", 10)
    assert cut.prompt_tokens == whole.prompt_tokens == 10


def test_echo_applies_stop_strings() -> None:
    engine = EchoEngine(settings())
    engine.add(req(1, max_tokens=5, stop=("four", "three")))
    (res,) = drain(engine)
    assert (res.text, res.finish_reason) == ("one two ", "stop")
    assert res.completion_tokens == 2


def test_echo_returns_interactive_first() -> None:
    engine = EchoEngine(settings())
    engine.add(req(1, priority=1))
    engine.add(req(2, priority=1))
    engine.add(req(3, priority=0))
    assert [r.id for r in engine.step()] == [3, 1, 2]
    assert not engine.has_unfinished()


def test_echo_abort_returns_abort_and_spares_the_rest() -> None:
    engine = EchoEngine(settings())
    engine.add(req(1))
    engine.add(req(2))
    engine.abort([1, 99])
    results = {r.id: r for r in drain(engine)}
    assert results[1].finish_reason == "abort" and results[1].text == ""
    assert results[2].finish_reason == "stop" and results[2].text == PROMPT
    assert len(results) == 2


# -- sim -------------------------------------------------------------------------------


def test_sim_generates_exactly_max_tokens_one_token_per_step() -> None:
    engine = sim(4)
    for rid, n in enumerate([1, 3, 7, 25], start=1):
        engine.add(req(rid, prompt="alpha beta", max_tokens=n))
    finished_at: dict[int, int] = {}
    step = 0
    while engine.has_unfinished():
        step += 1
        for res in engine.step():
            finished_at[res.id] = step
            assert res.completion_tokens == len(res.text.split())
            assert res.finish_reason == "length"
    assert finished_at == {1: 1, 2: 3, 3: 7, 4: 25}
    assert engine.meter.snapshot()["tokens"] == 1 + 3 + 7 + 25


def test_sim_output_cycles_the_prompt_and_honours_stop() -> None:
    engine = sim()
    engine.add(req(1, prompt="a b c", max_tokens=7))
    engine.add(req(2, prompt="a b c", max_tokens=7, stop=("c a",)))
    results = {r.id: r for r in drain(engine)}
    assert results[1].text == "a b c a b c a"
    assert (results[2].text, results[2].finish_reason, results[2].completion_tokens) == (
        "a b ",
        "stop",
        2,
    )


def test_sim_admits_interactive_before_bulk_when_slots_are_full() -> None:
    engine = sim(1)
    engine.add(req(1, max_tokens=2))
    engine.step()  # 1 holds the only slot
    engine.add(req(2, max_tokens=2, priority=1))
    engine.add(req(3, max_tokens=2, priority=0))
    order = [r.id for r in drain(engine)]
    assert order == [1, 3, 2]


def test_sim_abort_frees_slots_and_reports_abort() -> None:
    engine = sim(1)
    engine.add(req(1, max_tokens=10))
    engine.add(req(2, max_tokens=10))
    engine.add(req(3, max_tokens=2))
    engine.step()
    engine.step()
    assert engine.busy_slots() == 1
    engine.abort([1, 2])  # 1 is running, 2 is waiting
    assert engine.busy_slots() == 0
    results = drain(engine)
    aborted = {r.id: r for r in results if r.finish_reason == "abort"}
    assert set(aborted) == {1, 2}
    assert aborted[1].completion_tokens == 2 and aborted[2].completion_tokens == 0
    assert [r.id for r in results if r.finish_reason != "abort"] == [3]


def test_sim_step_takes_decode_and_prefill_time() -> None:
    engine = sim(4, sim_decode_step=0.02, sim_decode_per_seq=0.01, sim_prefill_per_token=0.002)
    engine.add(req(1, max_tokens=2))  # 10 prompt words each
    engine.add(req(2, max_tokens=2))
    t0 = time.monotonic()
    engine.step()  # decode 0.02 + 2 seqs x 0.01 + 20 prompt tokens x 0.002
    first = time.monotonic() - t0
    t1 = time.monotonic()
    engine.step()  # no prefill now: 0.02 + 2 x 0.01
    second = time.monotonic() - t1
    assert 0.08 <= first < 0.08 + 0.25
    assert 0.04 <= second < 0.04 + 0.25


def _run_sim(continuous: bool, lengths: list[int], slots: int) -> float:
    engine = sim(slots, sim_decode_step=0.001)
    pending = [req(i, prompt="x y z", max_tokens=n) for i, n in enumerate(lengths)]
    done = 0
    in_flight = 0
    while done < len(lengths):
        if continuous:
            # The worker's policy: keep about 2x slots admitted while work exists.
            while pending and in_flight < 2 * slots:
                engine.add(pending.pop(0))
                in_flight += 1
        elif in_flight == 0:
            # The naive policy: a fixed chunk, run until all of it finished.
            for _ in range(min(slots, len(pending))):
                engine.add(pending.pop(0))
                in_flight += 1
        finished = engine.step()
        done += len(finished)
        in_flight -= len(finished)
    assert engine.meter.snapshot()["tokens"] == sum(lengths)
    return engine.meter.occupancy()


def test_sim_keeps_slots_busy_only_when_fed_continuously() -> None:
    rng = random.Random(7)
    slots = 8
    lengths = [rng.randint(2, 40) for _ in range(320)]
    continuous = _run_sim(True, lengths, slots)
    chunked = _run_sim(False, lengths, slots)
    assert continuous >= 0.85, continuous
    assert chunked <= 0.7, chunked
    assert continuous - chunked >= 0.2


# -- occupancy meter -------------------------------------------------------------------


def test_meter_counts_gaps_between_steps_as_idle() -> None:
    meter = OccupancyMeter(slots=4)
    assert meter.occupancy() == 0.0
    meter.mark_add(now=10.0)
    meter.record_step(10.0, 11.0, busy=4, tokens=4)
    assert meter.occupancy() == pytest.approx(1.0)
    # Engine empty for a second (nothing to step), then half full for a second.
    meter.record_step(12.0, 13.0, busy=2, tokens=2)
    snap = meter.snapshot()
    assert snap == {"busy_slot_seconds": 6.0, "slot_seconds": 12.0, "steps": 2.0, "tokens": 6.0}
    assert meter.occupancy() == pytest.approx(0.5)
    meter.reset()
    assert meter.snapshot()["slot_seconds"] == 0.0


def test_meter_window_opens_at_first_add() -> None:
    meter = OccupancyMeter(slots=1)
    meter.mark_add(now=0.0)
    meter.mark_add(now=5.0)  # a later add does not move the start
    meter.record_step(1.0, 2.0, busy=1, tokens=1)
    assert meter.occupancy() == pytest.approx(0.5)  # waited 1 s for the first step


# -- streaming ------------------------------------------------------------------------


def _stream_run(
    engine: Engine, *requests: GenRequest
) -> tuple[dict[int, list[tuple[int, str]]], dict[int, GenResult]]:
    """Step to the end; each request's (step, piece) deltas and its result."""
    for request in requests:
        engine.add(request)
    pieces: dict[int, list[tuple[int, str]]] = {r.id: [] for r in requests}
    results: dict[int, GenResult] = {}
    step = 0
    while engine.has_unfinished():
        step += 1
        finished = engine.step()
        for d in engine.take_deltas():
            assert d.id not in results, "a piece after its request finished"
            pieces[d.id].append((step, d.text))
        results.update((r.id, r) for r in finished)
    return pieces, results


@pytest.mark.parametrize("kind", ["echo", "sim"])
def test_streaming_pieces_join_to_the_output_and_only_for_streaming_requests(kind: str) -> None:
    engine = EchoEngine(settings()) if kind == "echo" else sim()
    streamed = req(1, max_tokens=7, stop=["six"])
    streamed.stream = True
    pieces, results = _stream_run(engine, streamed, req(2, max_tokens=7))
    assert "".join(p for _, p in pieces[1]) == results[1].text == "one two three four five "
    assert pieces[2] == []
    if kind == "sim":
        # One word per step, as a decode step makes one token per sequence (the stop's
        # trailing space goes with the last).
        assert [s for s, _ in pieces[1]] == [1, 2, 3, 4, 5, 5]
