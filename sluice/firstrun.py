"""Checks and hints before a worker starts: one clear line instead of a crash-looping child."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sluice.config import Settings

# Engine -> (modules it imports, the extra that installs them).
NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "hf": (("torch", "transformers"), "hf"),
    "vllm": (("vllm",), "vllm"),
}
# Engines that load weights from SLUICE_MODEL (echo and sim only use it as a name).
LOADS_WEIGHTS = ("hf", "vllm")
EXAMPLE = "SLUICE_ENGINE=hf SLUICE_MODEL=Qwen/Qwen2.5-0.5B-Instruct"


def looks_local(model: str) -> bool:
    """A path rather than a Hugging Face id ("org/name")."""
    if model.startswith(("/", "./", "../", "~")):
        return True
    return len(Path(model).parts) > 2  # "org/name" is a hub id; deeper is a directory


def problem(settings: Settings) -> str | None:
    """Why this engine cannot start here (a missing package, a model path that is not there)."""
    needs = NEEDS.get(settings.engine)
    if needs is not None:
        modules, extra = needs
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            return (
                f"the {settings.engine} engine needs {' and '.join(missing)}, which is not "
                f"installed: pip install 'sluice[{extra}]'"
            )
    if settings.engine in LOADS_WEIGHTS:
        path = Path(settings.model).expanduser()
        if looks_local(settings.model) and not path.exists():
            return (
                f"SLUICE_MODEL={settings.model} does not exist (give a model directory, or "
                "a Hugging Face id such as meta-llama/Llama-3.1-8B-Instruct)"
            )
    return None


def serving_line(settings: Settings) -> str | None:
    """For a toy engine: what it does, and how to serve a real model instead."""
    if settings.engine == "echo":
        what = "the echo engine answers each prompt with the prompt itself (for trying Sluice)"
    elif settings.engine == "sim":
        what = "the sim engine echoes prompts with a GPU's timing (for benchmarks)"
    else:
        return None
    return (
        f"Note: {what}. To serve a real model: {EXAMPLE} sluice up "
        "(pip install 'sluice[hf]'), or SLUICE_ENGINE=vllm on a GPU; see the README."
    )
