"""`sluice status`: the API's /v1/admin/status as tables, JSON, or refreshed until Ctrl-C."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from sluice.client import Client

# Clear the screen and home the cursor between --watch refreshes (ANSI, any terminal).
CLEAR = "\x1b[2J\x1b[H"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns, two spaces apart; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return [line(list(headers)), *(line(r) for r in cells)]


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def render(doc: dict[str, Any]) -> str:
    """The status document as the tables a person reads."""
    out: list[str] = []
    t = doc["throughput"]
    out.append(
        f"throughput: {t['requests_per_second']:.1f} requests/s, "
        f"{t['tokens_per_second']:.0f} tokens/s (last 10 s)"
    )
    out.append("")
    out.append("QUEUE")
    out += table(
        ["MODEL", "PRIORITY", "QUEUED", "RUNNING"],
        [[q["model"], q["priority"], q["queued"], q["running"]] for q in doc["queue"]],
    )
    out.append("")
    out.append("WORKERS")
    workers = doc["workers"]
    if workers:
        out += table(
            ["WORKER", "MODEL", "ENGINE", "STATE", "BUSY/SLOTS", "OCCUPANCY", "REQ/S", "LAST SEEN"],
            [
                [
                    w["owner"],
                    w["model"] or "?",
                    w["engine"],
                    "live" if w["live"] else w["state"] if w["state"] != "running" else "stale",
                    f"{w['busy']}/{w['slots']}",
                    _pct(w["occupancy"]),
                    f"{w['requests_per_second']:.1f}",
                    _ago(w["last_seen_seconds"]),
                ]
                for w in workers
            ],
        )
    else:
        out.append("no workers (start one: sluice worker)")
    served = {w["model"] for w in workers if w["live"]}
    for model in doc["models"]:
        if model not in served:
            out.append(f"! no live worker serves {model!r}: its requests wait")
    out.append("")
    out.append("BATCHES")
    batches = doc["batches"]
    if batches:
        out += table(
            ["BATCH", "MODEL", "STATUS", "DONE", "FAILED", "TOTAL", "CREATED"],
            [
                [b["id"], b["model"], b["status"], b["completed"], b["failed"], b["total"],
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b["created_at"]))]
                for b in batches
            ],
        )  # fmt: skip
    else:
        out.append("no batches yet")
    return "\n".join(out)


def show(
    client: Client,
    out: TextIO,
    as_json: bool = False,
    watch: float | None = None,
    batches: int = 10,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Print the status once, or every `watch` seconds until interrupted (Ctrl-C)."""
    while True:
        doc = client.status(batches)
        if as_json:
            text = json.dumps(doc, indent=None if watch else 2)
        else:
            text = (CLEAR if watch else "") + render(doc)
        print(text, file=out, flush=True)
        if watch is None:
            return
        sleep(watch)
