"""Engines behind one interface; load_engine picks one from settings."""

from __future__ import annotations

from sluice.config import Settings
from sluice.errors import ConfigError
from worker.engines.base import Engine, GenRequest, GenResult, Sampling

__all__ = ["Engine", "GenRequest", "GenResult", "Sampling", "load_engine"]


def load_engine(settings: Settings) -> Engine:
    """Build the engine named by settings.engine (loads the model for hf and vllm)."""
    # hf and vllm are imported here so echo and sim never import torch or vllm.
    if settings.engine == "echo":
        from worker.engines.echo import EchoEngine

        return EchoEngine(settings)
    if settings.engine == "sim":
        from worker.engines.sim import SimEngine

        return SimEngine(settings)
    if settings.engine == "hf":
        from worker.engines.hf import HFEngine

        return HFEngine(settings)
    if settings.engine == "vllm":
        from worker.engines.vllm_engine import VLLMEngine

        return VLLMEngine(settings)
    raise ConfigError(f"SLUICE_ENGINE: unknown engine {settings.engine!r}")
