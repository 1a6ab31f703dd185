"""Engines behind one interface; load_engine builds the one settings name (see registry)."""

from __future__ import annotations

from sluice.config import Settings
from sluice.errors import ConfigError
from worker.engines.base import Engine, EngineSettings, GenRequest, GenResult, Sampling, Tokenizer
from worker.engines.registry import engine_class

__all__ = [
    "Engine",
    "EngineSettings",
    "GenRequest",
    "GenResult",
    "Sampling",
    "Tokenizer",
    "load_engine",
]


def load_engine(settings: Settings, **engine_settings: object) -> Engine:
    """Build the engine named by settings.engine (loads the model for hf and vllm), with its
    own settings read from the environment; keywords override them (tests, benchmarks)."""
    try:
        cls = engine_class(settings.engine)
    except KeyError as exc:
        raise ConfigError(f"SLUICE_ENGINE: {exc.args[0]}") from None
    return cls(settings, cls.settings_class.load(**engine_settings))
