"""Sim engine: echo-like output with the timing of a continuous-batching GPU.

Each step() is one decode step of a simulated device holding `slots` sequences: free slots
are filled from the waiting queue (priority 0 before 1, then FIFO), the step sleeps

    sim_decode_step + sim_decode_per_seq * running + sim_prefill_per_token * new prompt tokens

and every running sequence gains one token. A sequence generates exactly max_tokens tokens
(as with ignore_eos) unless a stop string ends it earlier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import Field

from sluice.config import Settings
from worker.engines.base import Delta, EngineSettings, GenRequest, GenResult
from worker.engines.meter import OccupancyMeter
from worker.engines.text import PlainTextEngine, WaitQueue, sim_output, stream_pieces


@dataclass
class _Seq:
    request: GenRequest
    prompt_tokens: int
    text: str
    finish_reason: str
    target: int  # tokens to generate before the sequence finishes
    generated: int = 0
    pieces: list[str] | None = None  # streaming: the text's words, sent one per step


class SimSettings(EngineSettings):
    """The simulated device's timing, in seconds (defaults: an 8B model on one H100)."""

    sim_prefill_per_token: float = Field(0.00002, ge=0)
    sim_decode_step: float = Field(0.010, ge=0)
    sim_decode_per_seq: float = Field(0.00005, ge=0)


class SimEngine(PlainTextEngine):
    """A simulated continuous-batching device; `meter` reports how full it was kept."""

    name = "sim"
    settings_class = SimSettings

    def __init__(self, settings: Settings, options: SimSettings | None = None) -> None:
        timing = options or SimSettings.load()
        self._slots = settings.max_num_seqs
        self._max_model_len = settings.max_model_len
        self._prefill_per_token = timing.sim_prefill_per_token
        self._decode_step = timing.sim_decode_step
        self._decode_per_seq = timing.sim_decode_per_seq
        self._waiting: WaitQueue[_Seq] = WaitQueue()
        self._running: dict[int, _Seq] = {}
        self._done: list[GenResult] = []  # aborted or rejected, returned by the next step
        self._deltas: list[Delta] = []
        self.meter = OccupancyMeter(self._slots)

    def busy_slots(self) -> int:
        """Sequences holding a slot now."""
        return len(self._running)

    def add(self, request: GenRequest) -> None:
        """Queue the request for a free slot (the worker checked that it fits the context)."""
        self.meter.mark_add()
        s = request.sampling
        prompt_tokens = len(self.prompt_ids(request))
        out, finish, target = sim_output(request.prompt, s.max_tokens, s.stop)
        seq = _Seq(request, prompt_tokens, out, finish, target)
        if request.stream:
            seq.pieces = stream_pieces(out)
        self._waiting.push(request.id, request.priority, seq)

    def abort(self, ids: list[int]) -> None:
        """Drop waiting or running requests; they come back with finish_reason 'abort'."""
        for request_id in ids:
            seq = self._waiting.remove(request_id) or self._running.pop(request_id, None)
            if seq is not None:
                self._done.append(
                    GenResult(request_id, "", "abort", seq.prompt_tokens, seq.generated)
                )

    def has_unfinished(self) -> bool:
        """True while anything waits, runs, or awaits return."""
        return bool(self._waiting) or bool(self._running) or bool(self._done)

    def step(self) -> list[GenResult]:
        """Admit into free slots, spend one simulated decode step, return finished sequences."""
        results, self._done = self._done, []
        start = time.monotonic()
        prefill_tokens = 0
        while len(self._running) < self._slots and (seq := self._waiting.pop()) is not None:
            self._running[seq.request.id] = seq
            prefill_tokens += seq.prompt_tokens
        running = len(self._running)
        if running == 0:
            return results
        duration = (
            self._decode_step
            + self._decode_per_seq * running
            + self._prefill_per_token * prefill_tokens
        )
        # Sleep to a deadline so bookkeeping time is part of the step, not added to it.
        remaining = start + duration - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        for seq in self._running.values():
            seq.generated += 1
            if seq.pieces is not None and seq.generated <= len(seq.pieces):
                self._deltas.append(Delta(seq.request.id, seq.pieces[seq.generated - 1]))
        finished = [seq for seq in self._running.values() if seq.generated >= seq.target]
        for seq in finished:
            if seq.pieces is not None and seq.generated < len(seq.pieces):
                # A stop string may leave more words than tokens counted: send the rest now.
                self._deltas.append(Delta(seq.request.id, "".join(seq.pieces[seq.generated :])))
            del self._running[seq.request.id]
            results.append(
                GenResult(
                    seq.request.id, seq.text, seq.finish_reason, seq.prompt_tokens, seq.generated
                )
            )
        self.meter.record_step(start, time.monotonic(), running, running)
        return results

    def take_deltas(self) -> list[Delta]:
        """Streaming requests' words from the last step (one per running sequence per step)."""
        out, self._deltas = self._deltas, []
        return out
