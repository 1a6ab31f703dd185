"""What each engine can honour of the request surface, importable without torch or vLLM.

The API checks every request against the served engine's set (settings.engine) at submit, so a
field an engine cannot honour is refused with a 400 naming it, never silently ignored. Each
Engine class carries the same set (Engine.capabilities); tests keep the two equal.
"""

from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    """What the served model does (SLUICE_TASK): generate text, or embed it (pooling)."""

    GENERATE = "generate"
    EMBED = "embed"


# The optional fields: each one is honoured only by the engines listing it. Everything else
# of the surface (model, prompt/messages, max_tokens, temperature, top_p, stop, user,
# metadata) every engine honours.
N = "n"
SEED = "seed"
TOP_K = "top_k"
MIN_P = "min_p"
REPETITION_PENALTY = "repetition_penalty"
PRESENCE_PENALTY = "presence_penalty"
FREQUENCY_PENALTY = "frequency_penalty"
LOGPROBS = "logprobs"
RESPONSE_FORMAT = "response_format"
IGNORE_EOS = "ignore_eos"

OPTIONAL = frozenset(
    {
        N,
        SEED,
        TOP_K,
        MIN_P,
        REPETITION_PENALTY,
        PRESENCE_PENALTY,
        FREQUENCY_PENALTY,
        LOGPROBS,
        RESPONSE_FORMAT,
        IGNORE_EOS,
    }
)

# Why these sets:
# - echo's "model" puts all probability on one token (the prompt's next word), so every
#   sampler filter and penalty leaves its output as it is (honoured, vacuously), n copies are
#   n identical choices and each token's logprob is exactly 0.0. It cannot follow a schema.
# - sim replays echo words with a GPU's timing: n > 1 would need n slots' timing, and it has
#   no logprobs to report; it refuses both (and response_format).
# - hf's generate() has top_k, min_p, repetition_penalty, num_return_sequences, a seed and
#   raw logits per step (logprobs), but no presence/frequency penalties and no grammar.
# - vLLM honours the whole surface (structured outputs through its xgrammar backend).
CAPABILITIES: dict[str, frozenset[str]] = {
    "echo": OPTIONAL - {RESPONSE_FORMAT},
    "sim": frozenset(
        {SEED, TOP_K, MIN_P, REPETITION_PENALTY, PRESENCE_PENALTY, FREQUENCY_PENALTY, IGNORE_EOS}
    ),
    "hf": frozenset({N, SEED, TOP_K, MIN_P, REPETITION_PENALTY, LOGPROBS, IGNORE_EOS}),
    "vllm": OPTIONAL,
}

# An engine plugged in through an entry point and missing from the table: only the base surface.
DEFAULT: frozenset[str] = frozenset()


def capabilities(engine: str) -> frozenset[str]:
    """The optional fields the named engine honours."""
    return CAPABILITIES.get(engine, DEFAULT)


# Which tasks each engine serves: only vLLM (its pooling runner) and echo (a deterministic
# stand-in for tests) embed; sim and hf generate only.
TASKS: dict[str, frozenset[Task]] = {
    "echo": frozenset(Task),
    "sim": frozenset({Task.GENERATE}),
    "hf": frozenset({Task.GENERATE}),
    "vllm": frozenset(Task),
}


def tasks(engine: str) -> frozenset[Task]:
    """The tasks the named engine serves (an unlisted plug-in engine: generate)."""
    return TASKS.get(engine, frozenset({Task.GENERATE}))
