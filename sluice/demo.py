"""`make demo`: build the tiny model, run ~200 prompts through the real stack, show results."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

from sluice.cli import main as sluice_main

TOPICS = [
    "rivers",
    "bread",
    "lighthouses",
    "owls",
    "glaciers",
    "violins",
    "tides",
    "maps",
    "bees",
    "comets",
    "ferns",
    "harbours",
    "kites",
    "lanterns",
    "orchards",
    "salt",
]
ASKS = [
    "Write one sentence about {t}.",
    "List three facts about {t}.",
    "Describe {t} to a child.",
    "Give {t} a short poem.",
    "Why do people like {t}?",
]


def write_prompts(path: Path, n: int = 200, seed: int = 7) -> Path:
    """A JSONL of chat and plain prompts with mixed lengths (deterministic)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(n):
            ask = rng.choice(ASKS).format(t=rng.choice(TOPICS))
            line = {
                "messages": [
                    {"role": "system", "content": "You are concise."},
                    {"role": "user", "content": ask},
                ],
                "max_tokens": rng.choice([8, 16, 32]),
                "temperature": 0,
            }
            fh.write(json.dumps(line) + "\n")
    return path


def main() -> int:
    """Run the demo on the hf engine with the tiny model, in ./.sluice/demo."""
    data = Path(os.environ.get("SLUICE_DATA_DIR", ".sluice")).resolve()
    demo = data / "demo"
    model_dir = data / "models" / "tiny-llama"
    if not (model_dir / "config.json").is_file():
        print(f"building the tiny model in {model_dir} ...", flush=True)
        if sluice_main(["model", "tiny", str(model_dir)]) != 0:
            return 1
    prompts = write_prompts(demo / "prompts.jsonl")
    results = demo / "results.jsonl"
    # The demo's own settings; a configured database or Redis is still honoured.
    os.environ.update(
        {
            "SLUICE_ENGINE": "hf",
            "SLUICE_MODEL": str(model_dir),
            "SLUICE_MODEL_NAME": "tiny-llama",
            "SLUICE_MAX_NUM_SEQS": "32",
            "SLUICE_DATA_DIR": str(demo),
        }
    )
    from sluice.config import get_settings

    get_settings.cache_clear()
    code = sluice_main(["run", str(prompts), "-o", str(results)])
    if code == 0:
        first = json.loads(results.read_text().splitlines()[0])
        text = first["response"]["body"]["choices"][0]["message"]["content"]
        print(
            f"\n200 prompts ran through API -> Redis -> worker (hf, tiny random Llama) -> "
            f"database.\nprompts: {prompts}\nresults: {results}\n"
            f"first result ({first['custom_id']}): {text[:80]!r} (random weights: "
            "gibberish is expected)"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
