"""The one interface every engine implements: add requests, step, collect finished ones."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from sluice.sampling import Sampling

__all__ = ["Engine", "GenRequest", "GenResult", "Sampling"]


@dataclass
class GenRequest:
    """A request ready for an engine: a rendered prompt and its sampling."""

    id: int
    prompt: str
    sampling: Sampling
    priority: int = 1  # 0 interactive, 1 bulk: lower is admitted first
    prompt_token_ids: list[int] | None = None


@dataclass
class GenResult:
    """What an engine returns for one finished request."""

    id: int
    text: str = ""
    finish_reason: str = "stop"  # stop | length | abort | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Engine(ABC):
    """An engine holding up to `slots` sequences; the worker feeds it continuously.

    Threading: add(), abort() and step() are called from one thread (the engine thread).
    """

    name: str = "engine"

    # Set by each engine's __init__: slots from settings.max_num_seqs, the context length
    # from settings.max_model_len as the model permits.
    _slots: int
    _max_model_len: int

    @property
    def slots(self) -> int:
        """How many sequences the engine runs at once (vLLM's max_num_seqs)."""
        return self._slots

    @property
    def max_model_len(self) -> int:
        """Context length: prompt tokens plus max_tokens must fit."""
        return self._max_model_len

    @abstractmethod
    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """Apply the model's chat template (with the generation prompt)."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of prompt tokens the engine will see for this text."""

    @abstractmethod
    def add(self, request: GenRequest) -> None:
        """Admit a request; it starts as soon as a slot is free (interactive first)."""

    @abstractmethod
    def abort(self, ids: list[int]) -> None:
        """Drop these requests; each comes back from step() with finish_reason 'abort'."""

    @abstractmethod
    def has_unfinished(self) -> bool:
        """True while any admitted request has not been returned by step()."""

    @abstractmethod
    def step(self) -> list[GenResult]:
        """Advance the engine once; return the requests that finished in this step."""

    def busy_slots(self) -> int:
        """Sequences running right now (for the occupancy meter)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model (GPU memory, threads)."""
