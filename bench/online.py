"""Online serving beside bulk work: streaming chat latency and bulk throughput, one engine.

The sim engine (bench/feed.py's: 64 slots, a 5 ms decode step) runs in the real worker
process behind the real API, Redis and SQLite. Streaming chat clients (the /v1/chat/completions
SSE endpoint, 32 tokens each, back to back) at 1, 16 and 64 at once measure time to first
token (TTFT: request sent to the first content piece) and end-to-end latency ([DONE]):

1. idle: the online clients alone;
2. bulk alone: a 20,000-request file (8-48 tokens each) on the same engine, no online load;
3. bulk + online: the same file again while the client levels cycle (1, 16, 64, 1, ...)
   until it completes; only requests that ended while the file still ran count.

Targets (issue 9): p50 TTFT during bulk within 1.5x of idle; bulk throughput with online load
at least 90% of bulk alone.

    python bench/online.py [--requests 20000] [--seconds 5] [--quick]

With --engine vllm (run it with .venv-vllm's Python: `make bench-online-vllm`) the worker runs
real vLLM on the tiny model (`sluice model tiny`, or --model), 16 slots, every request with
ignore_eos so lengths hold on random weights; the default file is 6,000 requests and the
client levels 1, 4 and 16 (on 2 CPU cores the engine, not the plumbing, is the bottleneck).

Prints a table and writes it to bench/out/online.txt (online-vllm.txt with --engine vllm).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# The shared helpers: `python bench/online.py` puts bench/ first on sys.path.
from feed import MODEL, OUT, SLOTS, bulk_file, prompts, sim_stack

# Client levels (main() sets vLLM's).
LEVELS = [1, 16, 64]
VLLM_LEVELS = (1, 4, 16)
VLLM_SLOTS = 16
ONLINE_TOKENS = 32
# Bulk output lengths 8..48 tokens (uniform, seeded; mean 28): mixed lengths end at different
# steps, so slots free every step. (With one fixed length the file runs in waves: all 64 slots
# free at once every 16 steps, and an online request waits for the next wave, ~150 ms here.)
BULK_TOKENS = (8, 48)
MESSAGES = [{"role": "user", "content": "what does a sluice do in a canal"}]
HEADERS: dict[str, str] = {}


@dataclass
class Sample:
    """One streamed request, client side."""

    ttft: float
    e2e: float
    ended: float  # monotonic


@dataclass
class Level:
    """The samples of one concurrency level."""

    clients: int
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0

    def p(self, what: str, q: float) -> float | None:
        """A quantile of ttft or e2e in ms (None without samples)."""
        values = sorted(getattr(s, what) for s in self.samples)
        if not values:
            return None
        return 1000 * values[min(len(values) - 1, int(q * len(values)))]


# Extra fields of every online request (vLLM: ignore_eos, so answers have their full length).
ONLINE_EXTRA: dict[str, object] = {}


async def one(http: httpx.AsyncClient) -> Sample | None:
    """One streamed chat request; None if it failed."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": ONLINE_TOKENS, "stream": True,
            **ONLINE_EXTRA}  # fmt: skip
    t0 = time.perf_counter()
    ttft: float | None = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return None
        async for line in response.aiter_lines():
            if ttft is None and '"content":"' in line and '"content":""' not in line:
                ttft = time.perf_counter() - t0
            if line == "data: [DONE]":
                break
            if '"error"' in line:
                return None
    end = time.perf_counter()
    if ttft is None:
        return None
    return Sample(ttft, end - t0, time.monotonic())


async def level(http: httpx.AsyncClient, clients: int, seconds: float, into: Level) -> None:
    """`clients` clients sending requests back to back for `seconds`."""
    stop = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < stop:
            try:
                got = await one(http)
            except httpx.HTTPError:
                got = None
            if got is None:
                into.errors += 1
            else:
                into.samples.append(got)

    await asyncio.gather(*(client() for _ in range(clients)))


def _client(url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max(LEVELS) + 8, max_keepalive_connections=max(LEVELS))
    return httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=HEADERS)


async def idle(url: str, seconds: float) -> dict[int, Level]:
    """Each level alone on an idle engine."""
    out = {c: Level(c) for c in LEVELS}
    async with _client(url) as http:
        await one(http)  # warm: connections, first claim
        for c in LEVELS:
            await level(http, c, seconds, out[c])
    return out


async def during(url: str, batch_done: asyncio.Event, seconds: float) -> dict[int, Level]:
    """Levels cycling while the bulk file runs; samples after it ended are dropped."""
    out = {c: Level(c) for c in LEVELS}
    async with _client(url) as http:
        while not batch_done.is_set():
            for c in LEVELS:
                if batch_done.is_set():
                    break
                await level(http, c, seconds, out[c])
    return out


async def watch(url: str, batch_id: str, done: asyncio.Event, ended: list[float]) -> None:
    """Set `done` when the batch completes (polled every 0.1 s)."""
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=HEADERS) as http:
        while True:
            b = (await http.get(f"/v1/batches/{batch_id}")).json()
            if b["status"] in ("completed", "failed", "expired", "cancelled"):
                ended.append(time.monotonic())
                done.set()
                return
            await asyncio.sleep(0.1)


async def bulk_with_online(
    url: str, submit: float, batch_id: str, seconds: float
) -> tuple[float, dict[int, Level]]:
    """Run the online levels until the batch ends; (bulk seconds, levels)."""
    done = asyncio.Event()
    ended: list[float] = []
    watcher = asyncio.create_task(watch(url, batch_id, done, ended))
    levels = await during(url, done, seconds)
    await watcher
    for lv in levels.values():
        lv.samples = [s for s in lv.samples if s.ended <= ended[0]]
    return ended[0] - submit, levels


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:8.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:5.2f}x"


def report(
    args: argparse.Namespace,
    idle_levels: dict[int, Level],
    busy_levels: dict[int, Level],
    alone_s: float,
    with_s: float,
) -> str:
    """The table."""
    n = args.requests
    engine = (
        f"vLLM ({args.model}, CPU build), {VLLM_SLOTS} slots"
        if args.engine == "vllm"
        else f"sim engine, {SLOTS} slots, 5 ms decode step"
    )
    lines = [
        f"Online streaming chat ({ONLINE_TOKENS} tokens) beside a {n:,}-request bulk file "
        f"({BULK_TOKENS[0]}-{BULK_TOKENS[1]} tokens each); {engine}, SQLite.",
        "",
        "clients | TTFT p50 idle | TTFT p50 bulk | ratio | TTFT p99 idle | TTFT p99 bulk "
        "| e2e p50 idle | e2e p50 bulk | ratio | n idle/bulk | errors",
    ]
    worst = 0.0
    for c in LEVELS:
        a, b = idle_levels[c], busy_levels[c]
        t_a, t_b = a.p("ttft", 0.5), b.p("ttft", 0.5)
        if t_a and t_b:
            worst = max(worst, t_b / t_a)
        lines.append(
            f"{c:7d} | {_ms(t_a)} ms | {_ms(t_b)} ms | {_ratio(t_b, t_a)} | "
            f"{_ms(a.p('ttft', 0.99))} ms | {_ms(b.p('ttft', 0.99))} ms | "
            f"{_ms(a.p('e2e', 0.5))} ms | {_ms(b.p('e2e', 0.5))} ms | "
            f"{_ratio(b.p('e2e', 0.5), a.p('e2e', 0.5))} | {len(a.samples)}/{len(b.samples)} | "
            f"{a.errors + b.errors}"
        )
    rate_alone, rate_with = n / alone_s, n / with_s
    lines += [
        "",
        f"bulk alone:       {alone_s:7.1f} s  {rate_alone:8.0f} requests/s",
        f"bulk with online: {with_s:7.1f} s  {rate_with:8.0f} requests/s  "
        f"({rate_with / rate_alone:.2f} of alone; target >= 0.90)",
        f"worst p50 TTFT ratio during bulk: {worst:.2f}x (target <= 1.5x)",
        f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
        "(other processes on the host skew every number above)",
    ]
    return "\n".join(lines)


def vllm_env(args: argparse.Namespace) -> dict[str, str]:
    """The worker's settings for real vLLM on the tiny model (built here unless --model)."""
    if args.model is None:
        from sluice.tiny_model import build_tiny_model

        args.model = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="sluice-tiny-"))))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return {
        "SLUICE_ENGINE": "vllm",
        "SLUICE_MODEL": args.model,
        "SLUICE_MODEL_NAME": MODEL,
        "SLUICE_MAX_NUM_SEQS": str(VLLM_SLOTS),
        "SLUICE_MAX_MODEL_LEN": "512",
        "SLUICE_DTYPE": "float32",
        "SLUICE_QUANTIZATION": "",
        "SLUICE_GPU_MEMORY_UTILIZATION": "0.3",
        "VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"],
    }


def main() -> None:
    """Run the three phases on one stack and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="bulk file size")
    parser.add_argument("--seconds", type=float, default=5.0, help="per client level")
    parser.add_argument("--quick", action="store_true", help="2,000 requests, 2 s levels")
    parser.add_argument("--engine", choices=("sim", "vllm"), default="sim")
    parser.add_argument("--model", help="vllm: a model directory (default: sluice model tiny)")
    args = parser.parse_args()
    env: dict[str, str] = {}
    bulk_extra: dict[str, object] = {}
    if args.engine == "vllm":
        env = vllm_env(args)
        LEVELS[:] = VLLM_LEVELS
        ONLINE_EXTRA["ignore_eos"] = bulk_extra["ignore_eos"] = True
        if args.requests == parser.get_default("requests"):
            args.requests = 6_000  # ~40 s alone: every client level runs twice beside it
    if args.quick:
        args.requests, args.seconds = min(args.requests, 2_000), 2.0
    rng = random.Random(5)
    lengths = [rng.randint(*BULK_TOKENS) for _ in range(args.requests)]
    data = bulk_file(lengths, prompts(args.requests), bulk_extra)
    with sim_stack(env) as sim:
        url = sim.stack.url
        # The stack's local admin key (every client here sends it).
        HEADERS.update(getattr(sim.stack, "auth_headers", {}))
        sim.http.headers.update(HEADERS)
        # Warm-up: the engine's first batches (vLLM's kernels for new batch shapes) and the
        # file path's first claims would otherwise be charged to "bulk alone".
        print("warm-up ...", file=sys.stderr)
        sim.wait_batch(sim.submit_file(bulk_file(lengths[:300], prompts(300), bulk_extra)))
        print("idle levels ...", file=sys.stderr)
        idle_levels = asyncio.run(idle(url, args.seconds))
        print("bulk alone ...", file=sys.stderr)
        t0 = time.monotonic()
        sim.wait_batch(sim.submit_file(data), timeout=3600)
        alone_s = time.monotonic() - t0
        print("bulk with online load ...", file=sys.stderr)
        t0 = time.monotonic()
        batch_id = sim.submit_file(data)
        with_s, busy_levels = asyncio.run(bulk_with_online(url, t0, batch_id, args.seconds))
    table = report(args, idle_levels, busy_levels, alone_s, with_s)
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    name = "online-vllm.txt" if args.engine == "vllm" else "online.txt"
    (OUT / name).write_text(table + "\n")


if __name__ == "__main__":
    main()
