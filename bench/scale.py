"""Scale-out: one worker vs two workers with sim engines on one queue, same bulk file.

Each worker is a real `sluice worker` process with its own sim engine (64 slots, 5 ms decode
step, as in bench/feed.py); the second one is started with the same environment as the
stack's own worker, so both consume the model's one queue in the same Redis and claim rows
in the same SQLite database. The sim engine's "GPU" is a sleep, so two workers can truly run
in parallel on two CPU cores as long as the plumbing's Python is small.

Runs: one worker; two workers from the start; two workers where the second one starts while
the file already runs (adding a GPU to a busy queue). Each two-worker run is repeated per
message size (SLUICE_CHUNK_SIZE: the default, and smaller).

Throughput is requests from the first claim to the last result (database timestamps);
the share of each worker comes from requests.lease_owner, its occupancy from its meter.

    python bench/scale.py [--requests 3000] [--chunk-sizes default,128] [--late 2]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass

# The shared helpers: `python bench/scale.py` puts bench/ first on sys.path.
from feed import (
    OUT,
    SLOTS,
    Sampler,
    Timing,
    bulk_file,
    ideal,
    occupancy,
    output_lengths,
    prompts,
    sim_stack,
    words,
)
from sqlalchemy import select

from sluice.models import requests


@dataclass
class ScaleRun:
    """One run of the file on n workers."""

    name: str
    chunk: int  # request ids per queue message
    timing: Timing
    shares: list[int]  # requests per worker, largest first
    queued: list[float]  # occupancy per worker while the queue had work
    queued_tokens_per_s: float  # all engines together, while the queue had work


def run(name: str, workers: int, data: bytes, n: int, chunk: int | None, late: float) -> ScaleRun:
    """Run the file on a fresh stack; with `late`, the last worker starts that long after."""
    env = {"SLUICE_CHUNK_SIZE": str(chunk)} if chunk else {}
    with sim_stack(env, workers - (1 if late else 0)) as sim, Sampler(sim.redis) as sampler:
        batch_id = sim.submit_file(data)
        if late:
            time.sleep(late)
            sim.add_worker()
        owners = sim.wait_workers(workers)
        b = sim.wait_batch(batch_id)
        if b["request_counts"]["completed"] != n:
            raise RuntimeError(f"{name}: batch ended {b['status']} {b['request_counts']}")
        sim.wait_completed(sampler, n)
        timing = sim.timing([batch_id])
        with sim.db.read() as conn:
            by_owner = Counter(
                conn.execute(select(requests.c.lease_owner).where(requests.c.batch_id == batch_id))
                .scalars()
                .all()
            )
        occ = [
            occupancy(sampler.of(o), timing.last_claim)
            for o in owners
            if sampler.of(o) and sampler.of(o)[-1].slot_seconds > 0
        ]
    shares = sorted((by_owner.get(o, 0) for o in owners), reverse=True)
    return ScaleRun(
        name,
        chunk or sim.settings.chunk_size,
        timing,
        shares,
        [o.queued for o in occ],
        sum(o.queued_tokens_per_s for o in occ),
    )


def report(runs: list[ScaleRun], lengths: list[int], texts: list[str]) -> str:
    """The printed table."""
    n, tokens = len(lengths), sum(lengths)
    one, two = (ideal(lengths, words(texts), engines=e).seconds for e in (1, 2))
    lines = [
        f"Scale-out: one sim engine per worker ({SLOTS} slots, 5 ms step), one queue, one Redis,",
        f"one SQLite database; {n} requests, {tokens:,} output tokens, max_tokens 16..512.",
        "Throughput: first claim to last result. 'queued': up to the last claim, while the queue",
        "still had work (tokens/s of all engines together; occupancy per worker). A zero-overhead",
        f"model of two engines fed in file order finishes this file {one / two:.2f}x faster than "
        "one (the final drain does not shrink).",
        "",
        f"{'workers':<22}{'ids/msg':>8}{'req/s':>8}{'tokens/s':>10}{'seconds':>9}{'speed-up':>9}"
        f"{'queued tok/s':>13}{'speed-up':>9}  {'requests per worker':<20}occupancy queued",
    ]
    base = runs[0]
    for r in runs:
        t = r.timing
        lines.append(
            f"{r.name:<22}{r.chunk:>8}{t.count / t.seconds:>8.1f}{t.tokens / t.seconds:>10,.0f}"
            f"{t.seconds:>9.1f}{base.timing.seconds / t.seconds:>8.2f}x"
            f"{r.queued_tokens_per_s:>13,.0f}"
            f"{r.queued_tokens_per_s / base.queued_tokens_per_s:>8.2f}x"
            f"  {' + '.join(map(str, r.shares)):<20}" + " / ".join(f"{o:.1%}" for o in r.queued)
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """One worker, then two; then a second worker that joins a running file."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="bulk file lines")
    ap.add_argument(
        "--chunk-sizes",
        default="default,128",
        help="ids per message for the two-worker runs ('default': SLUICE_CHUNK_SIZE's default)",
    )
    ap.add_argument("--late", type=float, default=2.0, help="seconds before the late worker")
    args = ap.parse_args()
    lengths, texts = output_lengths(args.requests), prompts(args.requests)
    data = bulk_file(lengths, texts)
    sizes = [None if c.strip() == "default" else int(c) for c in args.chunk_sizes.split(",")]
    plan: list[tuple[str, int, int | None, float]] = [("1", 1, None, 0.0)]
    plan += [("2", 2, c, 0.0) for c in sizes]
    if args.late:
        plan += [(f"2, one joins at {args.late:g} s", 2, c, args.late) for c in sizes]
    runs = []
    for name, workers, chunk, late in plan:
        print(f"{name} worker(s), {chunk or 'default'} ids per message ...", flush=True)
        runs.append(run(name, workers, data, args.requests, chunk, late))
    text = report(runs, lengths, texts)
    print()
    print(text, end="")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scale.txt").write_text(text)
    print(f"wrote {OUT / 'scale.txt'}")


if __name__ == "__main__":
    main()
