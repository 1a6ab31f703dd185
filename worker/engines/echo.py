"""Echo engine: instant and deterministic, for tests and plumbing benchmarks."""

from __future__ import annotations

import math

from sluice.config import Settings
from worker.engines.base import (
    Choice,
    Delta,
    EngineSettings,
    GenRequest,
    GenResult,
    TokenLogprob,
    embedding_result,
    needs_choices,
    with_choices,
)
from worker.engines.text import (
    PlainTextEngine,
    WaitQueue,
    echo_output,
    sim_output,
    stream_pieces,
)

# Echo's embedding width: small, so stored vectors stay short in tests.
ECHO_DIMENSIONS = 16


def bag_of_tokens(ids: list[int]) -> list[float]:
    """Echo's embedding: token counts folded into 16 dimensions, unit length (so equal inputs
    get equal vectors and cosine similarity means shared tokens)."""
    vector = [0.0] * ECHO_DIMENSIONS
    for token in ids:
        vector[token % ECHO_DIMENSIONS] += 1.0
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def point_mass_logprobs(text: str, top: int) -> list[TokenLogprob]:
    """Echo's logprobs: each word token had probability 1, so logprob 0.0 and no rival."""
    words = text.split()
    tokens = [w if i == 0 else f" {w}" for i, w in enumerate(words)]
    return [TokenLogprob(t, 0.0, [(t, 0.0)][:top]) for t in tokens]


class EchoEngine(PlainTextEngine):
    """Returns each prompt's words (cut to max_tokens and at stop strings) on the next step."""

    name = "echo"

    def __init__(self, settings: Settings, options: EngineSettings | None = None) -> None:
        self._slots = settings.max_num_seqs
        self._max_model_len = settings.max_model_len
        self.task = settings.task
        self._waiting: WaitQueue[GenRequest] = WaitQueue()
        self._done: list[GenResult] = []  # aborted or rejected, returned by the next step
        self._deltas: list[Delta] = []

    def _prompt_tokens(self, request: GenRequest) -> int:
        if request.embed is not None:
            return sum(len(ids) for ids in request.embed)
        return len(self.prompt_ids(request))

    def add(self, request: GenRequest) -> None:
        """Queue the request (the worker checked that it fits the context)."""
        self._waiting.push(request.id, request.priority, request)

    def abort(self, ids: list[int]) -> None:
        """Drop waiting requests; they come back with finish_reason 'abort'."""
        for request_id in ids:
            request = self._waiting.remove(request_id)
            if request is not None:
                self._done.append(GenResult(request_id, "", "abort", self._prompt_tokens(request)))

    def has_unfinished(self) -> bool:
        """True while anything is queued or awaiting return."""
        return bool(self._waiting) or bool(self._done)

    def step(self) -> list[GenResult]:
        """Finish everything queued, interactive first."""
        results, self._done = self._done, []
        while (request := self._waiting.pop()) is not None:
            result = self._result(request)
            if request.stream:
                self._deltas += [Delta(request.id, piece) for piece in stream_pieces(result.text)]
            results.append(result)
        return results

    def _result(self, request: GenRequest) -> GenResult:
        if request.embed is not None:
            return embedding_result(request, [bag_of_tokens(ids) for ids in request.embed])
        s = request.sampling
        # ignore_eos: echo's "model" never ends, it keeps repeating the prompt (as sim does).
        make = sim_output if s.ignore_eos else echo_output
        out, finish, completion = make(request.prompt, s.max_tokens, s.stop)
        result = GenResult(request.id, out, finish, self._prompt_tokens(request), completion)
        if not needs_choices(s):
            return result
        logprobs = None if s.logprobs is None else point_mass_logprobs(out, s.logprobs)
        # Every choice is the same: the only sequence this model can produce.
        return with_choices(result, [Choice(out, finish, completion, logprobs)] * s.n)

    def take_deltas(self) -> list[Delta]:
        """Streaming requests' text, a word at a time, all produced by the last step."""
        out, self._deltas = self._deltas, []
        return out
