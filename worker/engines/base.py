"""The one interface every engine implements: add requests, step, collect finished ones.

An engine is one module under worker/engines/ (registered by name in worker/engines/registry.py)
holding a subclass of Engine. It owns its settings (an EngineSettings subclass named by
`settings_class`: SLUICE_ variables only it reads; Settings holds what every engine shares:
model, slots, context length, seed) and its tokenizer: the worker renders and tokenizes each
prompt once with `engine.tokenizer`, checks the context length once (worker/prepare.py) and
hands the token ids over in GenRequest.prompt_token_ids. The runner drives engines only through
add, abort, step, has_unfinished, busy_slots, slots and close, from one thread (dead() from
the watchdog), so an engine
that talks to a remote server or wraps an asyncio engine fits the same shape: add() queues,
step() returns what finished since the last call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from sluice.capabilities import Task, capabilities
from sluice.config import Settings, invalid_settings
from sluice.embeddings import stored_vectors
from sluice.errors import ConfigError
from sluice.sampling import Sampling

__all__ = [
    "Choice",
    "Delta",
    "Engine",
    "EngineSettings",
    "GenRequest",
    "GenResult",
    "Sampling",
    "TokenLogprob",
    "Tokenizer",
    "embedding_result",
]


@dataclass
class GenRequest:
    """A request ready for an engine: its prompt, token ids and sampling."""

    id: int
    prompt: str
    sampling: Sampling
    priority: int = 1  # 0 interactive, 1 bulk: lower is admitted first
    # Set by the worker (tokenized once, context checked); None only when a caller hands a
    # prompt straight to an engine, which then encodes it with its own tokenizer.
    prompt_token_ids: list[int] | None = None
    # Streaming (online stream=true): the engine reports text as it is produced, through
    # take_deltas(); every other request is returned only when it finishes.
    stream: bool = False
    # An embeddings request (/v1/embeddings, on an engine whose task is embed): each input's
    # token ids, pooled into one vector each (prompt and sampling unused); embedding_result()
    # stores the vectors as the response carries them (base64 when the client asked).
    embed: list[list[int]] | None = None
    embed_base64: bool = False


@dataclass
class Delta:
    """New text of a streaming request, in production order (its pieces join to the output)."""

    id: int
    text: str


@dataclass
class TokenLogprob:
    """One generated token: its text, its log probability, and the likeliest alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Choice:
    """One of a request's n sequences (OpenAI's choices[i])."""

    text: str
    finish_reason: str = "stop"
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them


@dataclass
class GenResult:
    """What an engine returns for one finished request."""

    id: int
    text: str = ""
    finish_reason: str = "stop"  # stop | length | abort | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens served from a prefix cache (vLLM reports them)
    # Every sequence, when the request asked for n > 1 or logprobs (else None: the common
    # case stays one string). text and finish_reason are then choices[0]'s, and
    # completion_tokens the sum over choices, as OpenAI counts usage.
    choices: list[Choice] | None = None
    # Who is to blame for `error`: the engine (a server error), or the request itself
    # ("invalid_request": the engine refused its parameters, e.g. a schema it cannot compile).
    error_code: str = "engine_error"


def needs_choices(sampling: Sampling) -> bool:
    """Whether a result must carry GenResult.choices (n > 1 or logprobs asked for)."""
    return sampling.n > 1 or sampling.logprobs is not None


def with_choices(result: GenResult, choices: list[Choice]) -> GenResult:
    """The result holding these choices (text, finish_reason and token count from them)."""
    result.choices = choices
    result.text = choices[0].text
    result.finish_reason = choices[0].finish_reason
    result.completion_tokens = sum(c.completion_tokens for c in choices)
    return result


def embedding_result(
    request: GenRequest, vectors: Sequence[Sequence[float]], cached_tokens: int = 0
) -> GenResult:
    """A finished embeddings request: one vector per input, in input order."""
    inputs = request.embed or []
    return GenResult(
        request.id,
        stored_vectors(vectors, request.embed_base64),
        prompt_tokens=sum(len(ids) for ids in inputs),
        cached_tokens=cached_tokens,
    )


class Tokenizer(Protocol):
    """The engine's view of its model's tokenizer: what the validator needs, nothing more."""

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """Apply the model's chat template (with the generation prompt)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids the model will see for this prompt (special tokens as the engine adds)."""
        ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, in one call (the validator tokenizes a claimed chunk)."""
        ...


class EngineSettings(BaseSettings):
    """An engine's own settings: SLUICE_ variables that only it reads (each engine's module
    subclasses this with its fields; none here)."""

    # Unknown SLUICE_ variables are other engines' (ignored); an unknown keyword is a mistake.
    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="forbid", frozen=True)

    @classmethod
    def load(cls, **overrides: object) -> Self:
        """Read the environment (overrides win); ConfigError naming each bad variable."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(invalid_settings(exc)) from None


class Engine(ABC):
    """An engine holding up to `slots` sequences; the worker feeds it continuously.

    Threading: add(), abort() and step() are called from one thread (the engine thread);
    `tokenizer` is used from the claimer thread, so it must not share state with step().
    """

    name: str = "engine"
    # The engine's own settings (load_engine reads them and hands them to __init__).
    settings_class: ClassVar[type[EngineSettings]] = EngineSettings
    # What it serves: engines that can embed (sluice.capabilities.TASKS) take settings.task.
    task: Task = Task.GENERATE

    # Set by each engine's __init__: slots from settings.max_num_seqs, the context length
    # from settings.max_model_len as the model permits.
    _slots: int
    _max_model_len: int

    @abstractmethod
    def __init__(self, settings: Settings, options: EngineSettings | None = None) -> None:
        """Load the model from settings and the engine's own `options` (None: read them from
        the environment); ConfigError on bad settings."""

    @property
    def capabilities(self) -> frozenset[str]:
        """Optional request fields this engine honours (sluice.capabilities, by name)."""
        return capabilities(self.name)

    @property
    def slots(self) -> int:
        """How many sequences the engine runs at once (vLLM's max_num_seqs)."""
        return self._slots

    @property
    def max_model_len(self) -> int:
        """Context length: prompt tokens plus max_tokens must fit."""
        return self._max_model_len

    @property
    @abstractmethod
    def tokenizer(self) -> Tokenizer:
        """The tokenizer whose ids this engine expects in GenRequest.prompt_token_ids."""

    def prompt_ids(self, request: GenRequest) -> list[int]:
        """The request's token ids: the worker's, else encoded here."""
        if request.prompt_token_ids is not None:
            return request.prompt_token_ids
        return self.tokenizer.encode(request.prompt)

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

    def take_deltas(self) -> list[Delta]:
        """Text that streaming requests produced since the last call, in order (after step()).

        A request's deltas always come before step() returns it finished; joined, they are its
        output text. Requests without `stream` produce none.
        """
        return []

    def dead(self) -> str | None:
        """Why the engine can no longer run (say, its engine process died), or None.

        Read by the runner's watchdog thread every second, so an engine that dies while idle
        is noticed too (step() would only raise on the next request): keep it a cheap read.
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model (GPU memory, threads, child processes); never hangs."""
