"""Model aliases (SLUICE_MODEL_ALIASES): names clients already use, mapped to a served model.

`gpt-4o-mini=llama-3.1-8b,gpt-4o=llama-3.1-8b` lets code written for OpenAI run by changing
base_url only. An alias resolves to its served model at entry; rows, queues and workers only
ever see served names.
"""

from __future__ import annotations

from sluice.config import Settings


def parse_aliases(spec: str) -> dict[str, str]:
    """`alias=model` pairs, comma-separated; ValueError naming the bad pair."""
    out: dict[str, str] = {}
    for pair in (p.strip() for p in spec.split(",")):
        if not pair:
            continue
        alias, sep, target = (part.strip() for part in pair.partition("="))
        if not sep or not alias or not target:
            raise ValueError(f"{pair!r} is not alias=model")
        if alias in out:
            raise ValueError(f"alias {alias!r} is given twice")
        out[alias] = target
    return out


def aliases(settings: Settings) -> dict[str, str]:
    """The configured aliases (alias -> served model)."""
    return parse_aliases(settings.model_aliases)


def resolve_model(settings: Settings, name: str) -> str | None:
    """The served model a client's name means, or None when nothing by that name is served."""
    if name in settings.accepted_models:
        return name
    return aliases(settings).get(name)


def known_models(settings: Settings) -> list[str]:
    """Every name a client may send: the served models, then the aliases."""
    served = settings.accepted_models
    return served + [a for a in aliases(settings) if a not in served]
