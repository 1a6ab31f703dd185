"""Engine registry: engine name -> the module and class that implement it.

Adding an engine is adding one module under worker/engines/ and its line here (or, from another
package, an entry point in the `sluice.engines` group). Modules are imported only when their
engine is loaded, so echo and sim workers never import torch or vLLM. This module imports
nothing from Sluice: sluice.config reads engine_names() to check SLUICE_ENGINE at start.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.engines.base import Engine

ENTRY_POINT_GROUP = "sluice.engines"

BUILTIN: dict[str, str] = {
    "echo": "worker.engines.echo:EchoEngine",  # instant, deterministic: tests, plumbing
    "sim": "worker.engines.sim:SimEngine",  # echo output with a GPU's timing: benchmarks
    "hf": "worker.engines.hf:HFEngine",  # transformers: small models, no vLLM
    "vllm": "worker.engines.vllm_engine:VLLMEngine",  # production
}


def engines() -> dict[str, str]:
    """Every registered engine: name -> 'module:Class' (built-ins win over entry points)."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**found, **BUILTIN}


def engine_names() -> list[str]:
    """Registered engine names, sorted."""
    return sorted(engines())


def engine_class(name: str) -> type[Engine]:
    """Import and return the class registered as `name`; KeyError names the known ones."""
    from worker.engines.base import Engine

    target = engines().get(name)
    if target is None:
        raise KeyError(f"unknown engine {name!r}; registered: {', '.join(engine_names())}")
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise TypeError(f"engine {name!r}: {target} is not an Engine subclass")
    return cls
