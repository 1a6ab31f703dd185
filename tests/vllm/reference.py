"""Raw vLLM `LLM.generate` (or `LLM.embed`) on items from a JSON file: the suite's reference.

Run as `python -m tests.vllm.reference IN OUT` in its own process (vLLM spawns its engine core,
hence the __main__ guard) with the same SLUICE_ settings the worker gets.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sluice.config import load_settings
from worker.engines.vllm_engine import engine_args

# EngineArgs fields that Sluice sets; LLM takes them as keyword arguments.
KNOBS = (
    "model",
    "served_model_name",
    "quantization",
    "dtype",
    "seed",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "gpu_memory_utilization",
    "enable_prefix_caching",
    "kv_cache_dtype",
    "tensor_parallel_size",
    "enforce_eager",
    "load_format",
    "scheduling_policy",
    "disable_log_stats",
    "runner",
)


def main(src: Path, dst: Path) -> None:
    """Generate for every {prompt, sampling} in src (or embed every {input}); write the
    outputs and token counts to dst."""
    from vllm import LLM, SamplingParams

    args = engine_args(load_settings())
    llm = LLM(**{k: getattr(args, k) for k in KNOBS})
    items = json.loads(src.read_text())
    if items and "input" in items[0]:
        pooled = llm.embed([item["input"] for item in items], use_tqdm=False)
        dst.write_text(
            json.dumps(
                [
                    {"embedding": o.outputs.embedding, "prompt_tokens": len(o.prompt_token_ids)}
                    for o in pooled
                ]
            )
        )
        return
    params = [SamplingParams(**item["sampling"]) for item in items]
    outputs = llm.generate([item["prompt"] for item in items], params, use_tqdm=False)
    dst.write_text(
        json.dumps(
            [
                {
                    "text": o.outputs[0].text,
                    "prompt_tokens": len(o.prompt_token_ids or []),
                    "completion_tokens": len(o.outputs[0].token_ids),
                    "finish_reason": o.outputs[0].finish_reason,
                }
                for o in outputs
            ]
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
