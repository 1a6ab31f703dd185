"""bench/vllm.py's child processes, and the CPU meter every run uses.

    python -m bench.vllm_child raw BATCH.jsonl RESULT.json
        raw vLLM: LLM.generate of every line of the batch file at once (the floor), with the
        engine settings Sluice's adapter derives from the SLUICE_ variables in the environment.
    python -m bench.vllm_child run-batch RESULT.json -- RUN_BATCH_ARGS...
        vLLM's own batch runner (vllm.entrypoints.launchers.run_batch), unchanged, with a
        clock and a CPU meter around its work: from reading the input file (engine loaded)
        to the output file written.

Both write {"seconds", "cpu_seconds", ...} to RESULT.json. Run from the repository root;
vLLM spawns its engine core, hence `python -m` and the __main__ guard.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
GPU_CHECK = ROOT / "scripts" / "gpu-check"

Key = tuple[int, float]  # (pid, create_time): a pid reused by a new process is another key


def load_gpu_check() -> ModuleType:
    """scripts/gpu-check (no .py suffix) as a module: its helpers are shared, not copied."""
    if "gpu_check" in sys.modules:
        return sys.modules["gpu_check"]
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(GPU_CHECK))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while built
    loader.exec_module(module)
    return module


def _machine_busy() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


class CpuMeter:
    """CPU seconds used by a set of processes between start() and stop().

    The set is found again at every sample (every `interval` s): a root's descendants
    (children, grandchildren: vLLM's engine core too) plus whatever `extra()` names (e.g. the
    PostgreSQL backends serving a scratch database). A process that exits between samples
    counts up to its last sample; one that appears after start() counts from zero.
    """

    def __init__(
        self,
        root: psutil.Process,
        include_root: bool,
        extra: Callable[[], list[psutil.Process]] | None = None,
        interval: float = 0.25,
        exclude: Callable[[psutil.Process], bool] | None = None,
    ) -> None:
        self.root = root
        self.include_root = include_root
        self.extra = extra
        self.interval = interval
        self.exclude = exclude
        self.base: dict[Key, float] = {}
        self.last: dict[Key, float] = {}
        self.names: dict[Key, str] = {}
        self.others = 0.0
        self._machine0 = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _procs(self) -> list[psutil.Process]:
        procs = [self.root] if self.include_root else []
        with contextlib.suppress(psutil.Error):
            procs += self.root.children(recursive=True)
        if self.extra is not None:
            procs += self.extra()
        if self.exclude is not None:
            procs = [p for p in procs if not self.exclude(p)]
        return procs

    def _sample(self) -> dict[Key, float]:
        seen: dict[Key, float] = {}
        for p in self._procs():
            with contextlib.suppress(psutil.Error):
                key = (p.pid, p.create_time())
                seen[key] = _cpu(p)
                if key not in self.names:
                    self.names[key] = p.name()
        return seen

    def start(self) -> None:
        """Take the baseline and start sampling."""
        self.base = self._sample()
        self._machine0 = _machine_busy()
        self.last = dict(self.base)
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.last.update(self._sample())

    def stop(self) -> float:
        """Stop sampling; CPU seconds used since start()."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.last.update(self._sample())
        own = sum(v - self.base.get(k, 0.0) for k, v in self.last.items())
        # What everything else on the (shared) machine used meanwhile: the noise.
        self.others = max(0.0, _machine_busy() - self._machine0 - own)
        return own

    def by_name(self) -> dict[str, float]:
        """CPU seconds per process name (after stop())."""
        out: dict[str, float] = {}
        for k, v in self.last.items():
            name = self.names.get(k, "?")
            out[name] = out.get(name, 0.0) + v - self.base.get(k, 0.0)
        return out


def chat_lines(path: Path) -> list[dict[str, Any]]:
    """The bodies of an OpenAI batch file (chat completions)."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line)["body"] for line in fh if line.strip()]


def run_raw(batch_path: Path, result_path: Path) -> None:
    """LLM.generate on every line at once; the clock covers chat rendering + generate."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import tokens_input

    from sluice.config import load_settings
    from worker.engines.vllm_engine import engine_args

    args = engine_args(load_settings())
    llm = LLM(**{k: getattr(args, k) for k in load_gpu_check().ENGINE_KNOBS})
    tok = llm.get_tokenizer()
    bodies = chat_lines(batch_path)

    def prompts(items: list[dict[str, Any]]) -> list[Any]:
        # What vLLM's chat path does: the template renders BOS as text, so no second one.
        out = []
        for b in items:
            text = tok.apply_chat_template(
                b["messages"], tokenize=False, add_generation_prompt=True
            )
            out.append(tokens_input(tok.encode(text, add_special_tokens=False)))
        return out

    def params(items: list[dict[str, Any]]) -> list[SamplingParams]:
        return [
            SamplingParams(
                max_tokens=b["max_tokens"],
                temperature=b.get("temperature", 1.0),
                ignore_eos=bool(b.get("ignore_eos")),
            )
            for b in items
        ]

    warm = bodies[: min(16, len(bodies))]
    llm.generate(prompts(warm), params(warm), use_tqdm=False)
    meter = CpuMeter(psutil.Process(), include_root=True)
    meter.start()
    start = time.perf_counter()
    outputs = llm.generate(prompts(bodies), params(bodies), use_tqdm=False)
    seconds = time.perf_counter() - start
    cpu = meter.stop()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs if o.outputs)
    cached = sum(o.num_cached_tokens or 0 for o in outputs)
    result_path.write_text(
        json.dumps(
            {
                "requests": len(outputs),
                "output_tokens": tokens,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "cpu_by_process": meter.by_name(),
                "others_cpu": meter.others,
                "cached_tokens": cached,
            }
        )
    )


def run_batch_runner(result_path: Path, argv: list[str]) -> None:
    """vLLM's run_batch main, timed from reading the input to the output written."""
    import asyncio

    import vllm.entrypoints.launchers.run_batch as rb

    meter = CpuMeter(psutil.Process(), include_root=True)
    marks: dict[str, float] = {}
    read_file, write_file = rb.read_file, rb.write_file

    async def timed_read(*a: Any, **k: Any) -> Any:
        meter.start()
        marks["start"] = time.perf_counter()
        return await read_file(*a, **k)

    async def timed_write(*a: Any, **k: Any) -> Any:
        got = await write_file(*a, **k)
        marks["end"] = time.perf_counter()
        marks["cpu"] = meter.stop()
        return got

    rb.read_file, rb.write_file = timed_read, timed_write
    sys.argv = ["run_batch", *argv]
    # The module's own __main__ block, less its metrics server (off unless asked for).
    args = rb.parse_args()
    asyncio.run(rb.main(args))
    result_path.write_text(
        json.dumps(
            {
                "seconds": marks["end"] - marks["start"],
                "cpu_seconds": marks["cpu"],
                "cpu_by_process": meter.by_name(),
                "others_cpu": meter.others,
            }
        )
    )


def main(argv: list[str]) -> int:
    """Dispatch to a child mode."""
    if argv[:1] == ["raw"] and len(argv) == 3:
        run_raw(Path(argv[1]), Path(argv[2]))
        return 0
    if argv[:1] == ["run-batch"] and len(argv) >= 3 and argv[2] == "--":
        run_batch_runner(Path(argv[1]), argv[3:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
