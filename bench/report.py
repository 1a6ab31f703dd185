"""One benchmark report: a markdown page with PNG plots of online latency beside bulk work.

The sim engine (bench/feed.py's: 64 slots, a 5 ms decode step) runs in the real worker
process behind the real API, embedded Redis and SQLite. One compact scenario:

1. idle: `--clients` streaming chat clients (/v1/chat/completions, 32 tokens, back to back)
   alone for `--seconds`;
2. bulk: a `--requests`-line file (max_tokens 16..512, median 64, fixed seed) submitted while
   the same clients keep streaming, until the batch completes.

A sampler polls the batch's request_counts through the API and the worker's stats key
(`sluice:stats:<owner>`, worker/stats.py) every `--interval` seconds; every online request's
time to first token (TTFT) and end-to-end latency is recorded client side.

    python bench/report.py [--requests 5000] [--clients 8] [--seconds 5] [--out DIR]
                           [--with-benchmarks]

Writes DIR/report.md (default bench/out/report/) with throughput.png, occupancy.png and
latency.png beside it, and prints the summary table. `--with-benchmarks` also runs
`bench/feed.py --quick` and `bench/online.py --quick` (minutes each) and includes their tables.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

# The shared helpers: `python bench/report.py` puts bench/ first on sys.path.
from feed import MODEL, OUT, ROOT, SLOTS, Sim, bulk_file, output_lengths, prompts, sim_stack
from online import ONLINE_TOKENS, one

from worker.stats import read_stats

PLOTS = ("throughput.png", "occupancy.png", "latency.png")
DPI = 80  # small PNGs: the example report is committed under docs/benchmarks/
# Rates are taken over this window: a 0.25 s sample holds 0-2 completions of a slow phase.
RATE_WINDOW = 1.0
QUANTILES = (0.5, 0.95, 0.99)
Points = list[tuple[float, float]]  # (wall time, value)
SINCE = "seconds since the clients started"
BENCHMARKS = (("bench/feed.py", "--quick"), ("bench/online.py", "--quick"))


@dataclass
class Latency:
    """One streamed chat request, client side (wall-clock seconds)."""

    start: float
    ttft: float
    e2e: float

    @property
    def end(self) -> float:
        """When its [DONE] arrived."""
        return self.start + self.e2e


@dataclass
class Series:
    """Everything sampled during the run, on the wall clock."""

    t0: float
    bulk_start: float = 0.0
    bulk_end: float = 0.0
    counts: list[tuple[float, int]] = field(default_factory=list)  # (t, completed + failed)
    stats: list[dict[str, Any]] = field(default_factory=list)  # the worker's documents
    latencies: list[Latency] = field(default_factory=list)
    errors: int = 0
    missed: int = 0  # samples lost to a transient HTTP or Redis error


class Sampler:
    """Polls the batch's counts and the worker's stats every `interval` in a thread."""

    def __init__(self, sim: Sim, series: Series, interval: float) -> None:
        self.sim = sim
        self.series = series
        self.interval = interval
        self.batch_id: str | None = None
        self._seen: set[tuple[str, float]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="report-sampler", daemon=True)
        self._http = httpx.Client(
            base_url=sim.stack.url, headers=sim.stack.auth_headers, timeout=30
        )

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        self._http.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except (httpx.HTTPError, redis.RedisError):
                # One missed sample leaves a gap in the plots; the run itself goes on.
                self.series.missed += 1

    def poll(self) -> None:
        """One sample: the batch's finished requests and any new stats document."""
        now = time.time()
        if self.batch_id is not None:
            c = self._http.get(f"/v1/batches/{self.batch_id}").json()["request_counts"]
            self.series.counts.append((now, int(c["completed"]) + int(c["failed"])))
        for owner, doc in read_stats(self.sim.redis).items():
            if (owner, doc["ts"]) not in self._seen and doc.get("meter"):
                self._seen.add((owner, doc["ts"]))
                self.series.stats.append(doc)


async def stream_clients(
    url: str, headers: dict[str, str], n: int, stop: asyncio.Event, series: Series
) -> None:
    """`n` streaming chat clients, back to back, until `stop` is set."""
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as http:

        async def client() -> None:
            while not stop.is_set():
                start = time.time()
                try:
                    got = await one(http)
                except httpx.HTTPError:
                    got = None
                if got is None:
                    series.errors += 1
                else:
                    series.latencies.append(Latency(start, got.ttft, got.e2e))

        await asyncio.gather(*(client() for _ in range(n)))


async def scenario(
    sim: Sim, sampler: Sampler, data: bytes, args: argparse.Namespace, series: Series
) -> None:
    """Clients alone for `args.seconds`, then the bulk file beside them until it ends."""
    stop = asyncio.Event()
    clients = asyncio.create_task(
        stream_clients(sim.stack.url, sim.stack.auth_headers, args.clients, stop, series)
    )
    await asyncio.sleep(args.seconds)
    series.bulk_start = time.time()
    sampler.batch_id = await asyncio.to_thread(sim.submit_file, data)
    batch = await asyncio.to_thread(sim.wait_batch, sampler.batch_id, 3600)
    series.bulk_end = time.time()
    if batch["status"] != "completed":
        raise RuntimeError(f"the bulk batch ended {batch['status']}")
    stop.set()
    await clients


def run(args: argparse.Namespace) -> Series:
    """Start the stack, run the scenario with the sampler on, stop the stack."""
    rng_lengths = output_lengths(args.requests)
    data = bulk_file(rng_lengths, prompts(args.requests))
    with sim_stack({}) as sim:
        series = Series(t0=time.time())
        with Sampler(sim, series, args.interval) as sampler:
            asyncio.run(scenario(sim, sampler, data, args, series))
    return series


# ---------------------------------------------------------------------------------------------
# Numbers


def phase(series: Series, name: str) -> list[Latency]:
    """Requests wholly inside a phase: idle (ended before the file), bulk (inside the file)."""
    if name == "idle":
        return [x for x in series.latencies if x.end <= series.bulk_start]
    return [
        x for x in series.latencies if x.start >= series.bulk_start and x.end <= series.bulk_end
    ]


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) in ms; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rates(points: Points, window: float = RATE_WINDOW) -> Points:
    """Per-second rates of a cumulative counter, each over the last `window` seconds."""
    out, j = [], 0
    for t, v in points:
        while j + 1 < len(points) and t - points[j + 1][0] >= window:
            j += 1
        t_prev, v_prev = points[j]
        if t > t_prev:
            out.append((t, (v - v_prev) / (t - t_prev)))
    return out


def meter_series(series: Series, key: str) -> Points:
    """One cumulative meter field of the (single) worker, in time order."""
    docs = sorted(series.stats, key=lambda d: d["ts"])
    return [(float(d["ts"]), float(d["meter"][key])) for d in docs]


def occupancy(series: Series) -> Points:
    """Busy slot-seconds over slot-seconds between consecutive stats documents (0..1)."""
    busy, total = meter_series(series, "busy_slot_seconds"), meter_series(series, "slot_seconds")
    out = []
    for (t, b), (_, s), (_, b0), (_, s0) in zip(busy[1:], total[1:], busy, total, strict=False):
        if s > s0:
            out.append((t, min(1.0, (b - b0) / (s - s0))))
    return out


def summary(series: Series, args: argparse.Namespace) -> list[list[str]]:
    """The summary table: rows of cells, the first row the header."""
    rows = [["metric", "idle", "during bulk", "ratio bulk/idle"]]
    idle, bulk = phase(series, "idle"), phase(series, "bulk")
    for what in ("ttft", "e2e"):
        for q in QUANTILES:
            a = quantile([getattr(x, what) for x in idle], q)
            b = quantile([getattr(x, what) for x in bulk], q)
            rows.append([f"{what.upper()} p{round(q * 100)} (ms)", _num(a), _num(b), _ratio(b, a)])
    rows.append(["online requests (errors)", f"{len(idle)}", f"{len(bulk)}", f"{series.errors}"])
    if series.missed:
        rows.append(["samples missed (HTTP or Redis errors)", "", f"{series.missed}", ""])
    seconds = series.bulk_end - series.bulk_start
    rows.append(["bulk seconds (submit to completed)", "", f"{seconds:.1f}", ""])
    rows.append(["bulk requests/s", "", f"{args.requests / seconds:.0f}", ""])
    occ = [y for t, y in occupancy(series) if series.bulk_start <= t <= series.bulk_end]
    mean_occ = f"{100 * sum(occ) / len(occ):.0f}%" if occ else "n/a"
    rows.append(["engine occupancy, mean of 1 s intervals", "", mean_occ, ""])
    return rows


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


def table(rows: list[list[str]]) -> str:
    """Rows as a markdown table (also readable as plain text)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots


def plots(series: Series, out: Path) -> None:
    """Write the three PNGs into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rel(points: Points) -> tuple[list[float], list[float]]:
        return [t - series.t0 for t, _ in points], [v for _, v in points]

    def shade(ax: Any) -> None:
        ax.axvspan(
            series.bulk_start - series.t0,
            series.bulk_end - series.t0,
            color="tab:orange",
            alpha=0.12,
            label="bulk file running",
        )

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    top.plot(*rel(rates([(t, float(c)) for t, c in series.counts])), label="bulk requests/s")
    top.set_ylabel("requests/s")
    bottom.plot(
        *rel(rates(meter_series(series, "tokens"))),
        color="tab:green",
        label="engine tokens/s (bulk + online)",
    )
    bottom.set_ylabel("tokens/s")
    for ax in (top, bottom):
        shade(ax)
        ax.legend(loc="upper right", fontsize="small")
    bottom.set_xlabel(SINCE)
    top.set_title(f"Throughput (sim engine, {SLOTS} slots, {RATE_WINDOW:g} s windows)")
    _save(fig, out / "throughput.png")

    fig, ax = plt.subplots(figsize=(8, 3.2))
    xs, ys = rel(occupancy(series))
    ax.plot(xs, [100 * y for y in ys], label="busy slots / slots")
    ax.set_ylim(0, 105)
    ax.set_ylabel("occupancy, %")
    ax.set_xlabel(SINCE)
    shade(ax)
    ax.legend(loc="best", fontsize="small")
    ax.set_title("Engine occupancy (the worker's meter, between its 1 s stats)")
    _save(fig, out / "occupancy.png")

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, what, title in zip(
        axes, ("ttft", "e2e"), ("time to first token", "end to end"), strict=True
    ):
        for name in ("idle", "bulk"):
            values = sorted(1000 * getattr(x, what) for x in phase(series, name))
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                label = "idle" if name == "idle" else "during bulk"
                ax.step(values, ys, where="post", label=f"{label} (n={len(values)})")
        ax.set_xlabel("ms")
        ax.set_title(f"{title}, CDF")
        ax.legend(loc="lower right", fontsize="small")
    axes[0].set_ylabel("fraction of requests")
    _save(fig, out / "latency.png")


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The report


def benchmarks() -> list[tuple[str, str]]:
    """Run the quick benchmarks as subprocesses: (command, printed output) each."""
    out = []
    for script, flag in BENCHMARKS:
        print(f"running {script} {flag} ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, script, flag], cwd=ROOT, capture_output=True, text=True, check=False
        )
        text = done.stdout if done.returncode == 0 else done.stdout + done.stderr[-4000:]
        out.append((f"`python {script} {flag}` (exit {done.returncode})", text.rstrip()))
    return out


def markdown(series: Series, args: argparse.Namespace, extra: list[tuple[str, str]]) -> str:
    """The report page."""
    cmd = "python bench/report.py " + " ".join(sys.argv[1:])
    lines = [
        "# Sluice benchmark report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{cmd.strip()}` "
        f"(`make bench-report`). Load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
        "CPUs at the end: other processes on the host skew every number.",
        "",
        f"The sim engine ({SLOTS} slots, 5 ms decode step) in the real worker behind the real "
        f"API, embedded Redis and SQLite. {args.clients} streaming chat clients "
        f"({ONLINE_TOKENS} tokens, back to back) alone for {args.seconds:g} s, then beside a "
        f"{args.requests:,}-request bulk file (max_tokens 16-512, median 64) until it "
        "completed. Latency is client side; a request counts for a phase only when it ran "
        "wholly inside it.",
        "",
        "## Summary",
        "",
        table(summary(series, args)),
        "",
        "## Throughput over time",
        "",
        "![throughput](throughput.png)",
        "",
        "## Engine occupancy",
        "",
        "![occupancy](occupancy.png)",
        "",
        "## Latency distributions",
        "",
        "![latency](latency.png)",
        "",
    ]
    for command, text in extra:
        lines += [f"## {command}", "", "```", text, "```", ""]
    return "\n".join(lines)


def main() -> None:
    """Run the scenario, write the report and its plots, print the summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000, help="bulk file lines")
    ap.add_argument("--clients", type=int, default=8, help="streaming chat clients")
    ap.add_argument("--seconds", type=float, default=5.0, help="idle phase length")
    ap.add_argument("--interval", type=float, default=0.25, help="sampling period, seconds")
    ap.add_argument("--out", type=Path, default=OUT / "report", help="output directory")
    ap.add_argument(
        "--with-benchmarks",
        action="store_true",
        help="also run feed.py and online.py --quick and include their tables",
    )
    args = ap.parse_args()
    print(f"idle {args.seconds:g} s, then {args.requests:,} bulk requests ...", file=sys.stderr)
    series = run(args)
    extra = benchmarks() if args.with_benchmarks else []
    args.out.mkdir(parents=True, exist_ok=True)
    plots(series, args.out)
    (args.out / "report.md").write_text(markdown(series, args, extra))
    print(table(summary(series, args)))
    print(f"wrote {args.out / 'report.md'} and {', '.join(PLOTS)} (model {MODEL})")


if __name__ == "__main__":
    main()
