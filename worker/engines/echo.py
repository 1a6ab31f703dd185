"""Echo engine: instant and deterministic, for tests and plumbing benchmarks."""

from __future__ import annotations

from sluice.config import Settings
from worker.engines.base import GenRequest, GenResult
from worker.engines.text import PlainTextEngine, WaitQueue, context_error, echo_output


class EchoEngine(PlainTextEngine):
    """Returns each prompt's words (cut to max_tokens and at stop strings) on the next step."""

    name = "echo"

    def __init__(self, settings: Settings) -> None:
        self._slots = settings.max_num_seqs
        self._max_model_len = settings.max_model_len
        self._waiting: WaitQueue[GenRequest] = WaitQueue()
        self._done: list[GenResult] = []  # aborted or rejected, returned by the next step

    def _prompt_tokens(self, request: GenRequest) -> int:
        if request.prompt_token_ids is not None:
            return len(request.prompt_token_ids)
        return self.count_tokens(request.prompt)

    def add(self, request: GenRequest) -> None:
        """Queue the request, or reject it now if it does not fit the context."""
        prompt_tokens = self._prompt_tokens(request)
        error = context_error(prompt_tokens, request.sampling.max_tokens, self.max_model_len)
        if error is not None:
            self._done.append(GenResult(request.id, "", "error", prompt_tokens, 0, error))
            return
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
