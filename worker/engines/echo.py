"""Echo engine: instant and deterministic, for tests and plumbing benchmarks."""

from __future__ import annotations

from sluice.config import Settings
from worker.engines.base import GenRequest, GenResult
from worker.engines.text import PlainTextEngine, WaitQueue, echo_output


class EchoEngine(PlainTextEngine):
    """Returns each prompt's words (cut to max_tokens and at stop strings) on the next step."""

    name = "echo"

    def __init__(self, settings: Settings) -> None:
        self._slots = settings.max_num_seqs
        self._max_model_len = settings.max_model_len
        self._waiting: WaitQueue[GenRequest] = WaitQueue()
        self._done: list[GenResult] = []  # aborted or rejected, returned by the next step

    def _prompt_tokens(self, request: GenRequest) -> int:
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
            s = request.sampling
            out, finish, completion = echo_output(request.prompt, s.max_tokens, s.stop)
            results.append(
                GenResult(request.id, out, finish, self._prompt_tokens(request), completion)
            )
        return results
