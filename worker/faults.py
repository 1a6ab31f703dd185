"""Fault injection for tests (SLUICE_FAULTS): crash, kill or hang on purpose, never by default.

A comma-separated list of `name=value`:
- `engine-crash-on=MARK`: the engine raises once a request whose prompt contains MARK is in it
  (vLLM raising from step(): the runner's engine-failure path).
- `engine-kill-on=MARK`: the worker process SIGKILLs itself instead (a segfault's stand-in).
- `engine-hang-on=MARK`: the engine's step blocks for good (a dead engine core).
- `thread-crash=NAME:N`: runner thread NAME (claimer, engine or writer) raises on its Nth turn.
- `load-hang=1`: the worker never finishes loading its engine (a stuck model download).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sluice.errors import ConfigError
from worker.engines.base import Delta, Engine, GenRequest, GenResult, Tokenizer

KINDS = ("engine-crash-on", "engine-kill-on", "engine-hang-on", "thread-crash", "load-hang")
THREADS = ("claimer", "engine", "writer")


class InjectedFault(RuntimeError):
    """Raised where a test asked for a fault."""


@dataclass
class Faults:
    """The faults a test asked for; all empty in production."""

    engine: dict[str, str] = field(default_factory=dict)  # kind -> marker
    thread: str | None = None
    thread_turn: int = 0
    load_hang: bool = False
    _turns: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """Read SLUICE_FAULTS; a typo is a ConfigError, not a silently healthy worker."""
        faults = cls()
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kind, _, value = item.partition("=")
            if kind not in KINDS or not value:
                raise ConfigError(f"SLUICE_FAULTS: {item!r} is not one of {KINDS} with a value")
            if kind == "thread-crash":
                name, _, turn = value.partition(":")
                if name not in THREADS or not turn.isdigit():
                    raise ConfigError(
                        f"SLUICE_FAULTS: thread-crash wants NAME:N, NAME in {THREADS}"
                    )
                faults.thread, faults.thread_turn = name, int(turn)
            elif kind == "load-hang":
                faults.load_hang = True
            else:
                faults.engine[kind] = value
        return faults

    def before_load(self) -> None:
        """Block for good where the engine would load, when a test asked (SIGTERM ends it)."""
        while self.load_hang:
            time.sleep(3600)

    def turn(self, thread: str) -> None:
        """Count one turn of a runner thread; raise on the one a test named."""
        if thread != self.thread:
            return
        self._turns[thread] = n = self._turns.get(thread, 0) + 1
        if n == self.thread_turn:
            raise InjectedFault(f"injected crash of the {thread} thread (turn {n})")

    def wrap(self, engine: Engine) -> Engine:
        """The engine, or a wrapper that misbehaves on marked prompts."""
        return FaultyEngine(engine, self.engine) if self.engine else engine


class FaultyEngine(Engine):
    """Delegates to a real engine; misbehaves once a marked request is in it."""

    def __init__(self, inner: Engine, faults: dict[str, str]) -> None:
        self.inner = inner
        self.faults = faults
        self.name = inner.name
        self._slots = inner.slots
        self._max_model_len = inner.max_model_len
        self._marked: dict[int, str] = {}  # request id -> fault kind

    def __getattr__(self, name: str) -> Any:
        # Engine-specific extras (the sim engine's meter) stay visible through the wrapper.
        return getattr(self.inner, name)

    @property
    def tokenizer(self) -> Tokenizer:
        """The inner engine's tokenizer."""
        return self.inner.tokenizer

    def add(self, request: GenRequest) -> None:
        """Admit, noting marked prompts."""
        for kind, mark in self.faults.items():
            if mark in request.prompt:
                self._marked[request.id] = kind
        self.inner.add(request)

    def abort(self, ids: list[int]) -> None:
        """Abort in the inner engine."""
        for rid in ids:
            self._marked.pop(rid, None)
        self.inner.abort(ids)

    def has_unfinished(self) -> bool:
        """The inner engine's answer."""
        return self.inner.has_unfinished()

    def step(self) -> list[GenResult]:
        """Misbehave if a marked request is in the engine, else step the inner engine."""
        kinds = set(self._marked.values())
        if "engine-kill-on" in kinds:
            os.kill(os.getpid(), signal.SIGKILL)
        if "engine-hang-on" in kinds:
            threading.Event().wait()
        if "engine-crash-on" in kinds:
            raise InjectedFault("injected engine crash on a marked prompt")
        return self.inner.step()

    def busy_slots(self) -> int:
        """The inner engine's count."""
        return self.inner.busy_slots()

    def take_deltas(self) -> list[Delta]:
        """The inner engine's streamed text."""
        return self.inner.take_deltas()

    def dead(self) -> str | None:
        """The inner engine's answer."""
        return self.inner.dead()

    def close(self) -> None:
        """Close the inner engine."""
        self.inner.close()
