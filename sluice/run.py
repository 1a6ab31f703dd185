"""`sluice run FILE`: submit a file of any length, follow it with a bar, write ordered results.

A file over the server's line limit travels as several batches (parts); the output file holds
one result line per input line, in input order. A run's batch ids are kept in
DATA_DIR/runs/<first batch id>.json, so `--resume BATCH_ID` follows a run again after the
client or the server went away (batches run on in the server meanwhile).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from sluice.client import ApiError, Client, to_batch_lines
from sluice.config import Settings

TERMINAL = ("completed", "failed", "expired", "cancelled")
# How long a server may be unreachable before the run gives up and says how to resume.
SERVER_GONE_AFTER = 15.0
# Error lines shown after a run; the rest are counted by code.
SHOW_ERRORS = 5
EXIT_LOST = 3


class ServerGone(Exception):
    """The server stopped answering for SERVER_GONE_AFTER seconds."""


def error_text(err: dict[str, Any]) -> str:
    """One error object as a line: its line number once (API messages already name it)."""
    message = str(err.get("message") or err.get("code") or "error")
    line = err.get("line")
    if line is None or message.startswith(f"line {line}:"):
        return message
    return f"line {line}: {message}"


@dataclass
class Part:
    """One batch of a run: its converted lines file and, once created, its batch."""

    path: Path
    count: int
    batch_id: str | None = None
    batch: dict[str, Any] = field(default_factory=dict)


def split_lines(src: Path, max_lines: int, max_bytes: int) -> list[tuple[Path, int]]:
    """Cut a batch-lines file into parts within both limits (the last part may be short)."""
    parts: list[tuple[Path, int]] = []
    out: TextIO | None = None
    lines = size = 0
    with src.open(encoding="utf-8") as fin:
        for raw in fin:
            n = len(raw.encode())
            if out is None or lines >= max_lines or size + n > max_bytes:
                if out is not None:
                    out.close()
                    parts[-1] = (parts[-1][0], lines)
                path = src.with_name(f"{src.stem}.part{len(parts) + 1}.jsonl")
                out = path.open("w", encoding="utf-8")
                parts.append((path, 0))
                lines = size = 0
            out.write(raw)
            lines += 1
            size += n
    if out is not None:
        out.close()
        parts[-1] = (parts[-1][0], lines)
    return parts


def served_model(client: Client) -> str:
    """The model the server serves (first of /v1/models)."""
    models = client.models()
    if not models:
        raise ApiError("the server lists no models at /v1/models")
    return str(models[0]["id"])


class Follower:
    """Polls a run's batches, draws one bar, and tells a server outage from a slow run."""

    def __init__(self, client: Client, parts: list[Part], stream: TextIO) -> None:
        self.client = client
        self.parts = parts
        self.stream = stream
        self.total = sum(p.count for p in parts)

    def _poll(self, part: Part) -> dict[str, Any]:
        deadline = time.monotonic() + SERVER_GONE_AFTER
        while True:
            try:
                return self.client.batch(part.batch_id or "")
            except (httpx.TransportError, ApiError) as exc:
                server_side = not isinstance(exc, ApiError) or " 50" in str(exc)
                if not server_side or time.monotonic() > deadline:
                    if server_side:
                        raise ServerGone(str(exc)) from None
                    raise
                time.sleep(1.0)

    def follow(self, interval: float = 0.5) -> None:
        """Until every batch has ended: refresh counts and the bar."""
        from tqdm import tqdm

        # A terminal that reports no size (0 x 0, e.g. a fresh pty) still gets a bar: tqdm
        # hides a bar below a screen height of 0.
        width, height = shutil.get_terminal_size((100, 24))
        with tqdm(
            total=self.total,
            unit="req",
            file=self.stream,
            ncols=max(width, 60),
            nrows=max(height, 24),
            desc="sluice run",
            smoothing=0.1,
        ) as bar:
            start, tokens0 = time.monotonic(), None
            while True:
                for part in self.parts:
                    if part.batch.get("status") not in TERMINAL:
                        part.batch = self._poll(part)
                ok = sum(p.batch["request_counts"]["completed"] for p in self.parts)
                failed = sum(p.batch["request_counts"]["failed"] for p in self.parts)
                tokens = sum(
                    int((p.batch.get("usage") or {}).get("output_tokens") or 0) for p in self.parts
                )
                tokens0 = tokens if tokens0 is None else tokens0
                elapsed = max(time.monotonic() - start, 1e-6)
                bar.set_postfix_str(
                    f"ok {ok}, failed {failed}, {(tokens - tokens0) / elapsed:,.0f} tok/s",
                    refresh=False,
                )
                bar.update(ok + failed - bar.n)
                if all(p.batch["status"] in TERMINAL for p in self.parts):
                    bar.refresh()
                    return
                time.sleep(interval)


def write_results(client: Client, parts: list[Part], out: Path) -> Counter[str]:
    """Output and error lines of every part, in input order; returns failures by code."""
    codes: Counter[str] = Counter()
    with out.open("w", encoding="utf-8") as fh:
        for part in parts:
            order = _order(client, part)
            lines: list[tuple[int, str]] = []
            for key in ("output_file_id", "error_file_id"):
                fid = part.batch.get(key)
                if not fid:
                    continue
                for raw in _iter_lines(client, f"/v1/files/{fid}/content"):
                    obj = json.loads(raw)
                    code = _failure_code(obj)
                    if code:
                        codes[code] += 1
                    lines.append((order.get(str(obj.get("custom_id")), len(order)), raw))
            lines.sort(key=lambda item: item[0])
            for _, raw in lines:
                fh.write(raw + "\n")
    return codes


def _order(client: Client, part: Part) -> dict[str, int]:
    """custom_id -> position in the part, from the lines the part was made of."""
    if part.path.is_file():
        src = part.path.read_text(encoding="utf-8").splitlines()
    else:  # resumed elsewhere: the server still has the input file
        src = list(_iter_lines(client, f"/v1/files/{part.batch['input_file_id']}/content"))
    order: dict[str, int] = {}
    for i, raw in enumerate(src):
        if raw.strip():
            order.setdefault(str(json.loads(raw).get("custom_id")), i)
    return order


def _iter_lines(client: Client, path: str) -> list[str]:
    data = b"".join(client.stream(path))
    return [line for line in data.decode("utf-8").splitlines() if line.strip()]


def _failure_code(obj: dict[str, Any]) -> str | None:
    if obj.get("error"):
        return str(obj["error"].get("code") or "error")
    response = obj.get("response") or {}
    if response.get("status_code", 200) >= 400:
        err = (response.get("body") or {}).get("error") or {}
        return str(err.get("code") or f"http_{response['status_code']}")
    return None


def _manifest_path(settings: Settings, run_id: str) -> Path:
    return settings.data_dir / "runs" / f"{run_id}.json"


def save_manifest(settings: Settings, parts: list[Part], url: str) -> str:
    """Remember the run's batches under its first batch id; returns that id."""
    run_id = str(parts[0].batch_id)
    path = _manifest_path(settings, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "url": url,
        "parts": [{"batch_id": p.batch_id, "path": str(p.path), "count": p.count} for p in parts],
    }
    path.write_text(json.dumps(doc))
    return run_id


def load_parts(settings: Settings, client: Client, run_id: str) -> list[Part]:
    """The parts of a run (from its manifest; a batch started elsewhere is a run of one)."""
    path = _manifest_path(settings, run_id)
    if path.is_file():
        doc = json.loads(path.read_text())
        return [Part(Path(p["path"]), int(p["count"]), p["batch_id"]) for p in doc["parts"]]
    batch = client.batch(run_id)
    return [Part(Path("-"), int(batch["request_counts"]["total"]), run_id, batch)]


def submit(
    client: Client, settings: Settings, src: Path, model: str | None, window: str
) -> tuple[list[Part], list[dict[str, Any]]]:
    """Convert, split and create the batches; returns (parts, errors of a refused part)."""
    converted = settings.data_dir / f"run-{src.stem}.batch.jsonl"
    endpoint, _count = to_batch_lines(src, converted, model or served_model(client))
    parts = [
        Part(p, n)
        for p, n in split_lines(converted, settings.max_file_lines, settings.max_file_bytes)
    ]
    for part in parts:
        uploaded = client.upload(part.path)
        batch = client.create_batch(uploaded["id"], endpoint, window)
        if batch["status"] == "failed":
            # Line numbers in a part's errors are the part's: shift them to the file's.
            offset = sum(p.count for p in parts[: parts.index(part)])
            errors = list((batch.get("errors") or {}).get("data") or [])
            for err in errors:
                if isinstance(err.get("line"), int) and offset:
                    old = err["line"]
                    err["line"] = old + offset
                    err["message"] = str(err.get("message", "")).replace(
                        f"line {old}:", f"line {old + offset}:", 1
                    )
            for done in parts[: parts.index(part)]:
                client.cancel(str(done.batch_id))
            return parts, errors
        part.batch_id, part.batch = batch["id"], batch
    return parts, []


def report(parts: list[Part], codes: Counter[str], out: Path, errors_out: TextIO) -> int:
    """The closing lines: counts, failures by code, where the results are; the exit code."""
    ok = sum(p.batch["request_counts"]["completed"] for p in parts)
    failed = sum(p.batch["request_counts"]["failed"] for p in parts)
    total = sum(p.count for p in parts)
    statuses = Counter(p.batch["status"] for p in parts)
    status = (
        ", ".join(f"{n} {s}" for s, n in statuses.items())
        if len(parts) > 1
        else (parts[0].batch["status"])
    )
    print(
        f"{status}: {ok} succeeded, {failed} failed of {total}; results in {out}", file=errors_out
    )
    if codes:
        print(
            "failures by code: " + ", ".join(f"{c} {n}" for c, n in codes.most_common()),
            file=errors_out,
        )
    return 0 if ok == total and statuses.keys() == {"completed"} else 1


def print_errors(errors: list[dict[str, Any]], stream: TextIO) -> None:
    """A refused file's errors: counts by code, then the first few lines."""
    codes = Counter(str(e.get("code")) for e in errors)
    print(
        f"the file was refused: {len(errors)} problem(s) ("
        + ", ".join(f"{c} {n}" for c, n in codes.most_common())
        + ")",
        file=stream,
    )
    for err in errors[:SHOW_ERRORS]:
        print("  " + error_text(err), file=stream)
    if len(errors) > SHOW_ERRORS:
        print(f"  ... and {len(errors) - SHOW_ERRORS} more", file=stream)


def lost(url: str, run_id: str, out: Path, why: str, stream: TextIO) -> int:
    """One clear message for a server that went away, with the command that resumes."""
    where = f" --url {url}" if url else ""
    print(
        f"sluice run: lost the server at {url or 'the embedded stack'} ({why}); the batches "
        f"keep their state there. Resume with:\n  sluice run --resume {run_id} -o {out}{where}",
        file=stream,
    )
    return EXIT_LOST


def run(client: Client, settings: Settings, args: Any, url: str, stream: TextIO) -> int:
    """Submit (or resume), follow, write; the exit code."""
    out = Path(args.output)
    if args.resume:
        parts = load_parts(settings, client, args.resume)
        run_id = args.resume
    else:
        parts, errors = submit(
            client, settings, Path(args.file), args.model, args.completion_window
        )
        if errors:
            print_errors(errors, stream)
            return 1
        run_id = save_manifest(settings, parts, url)
        if len(parts) > 1:
            print(
                f"{sum(p.count for p in parts)} lines over the {settings.max_file_lines:,}-line "
                f"limit: {len(parts)} batches ({run_id} first)",
                file=stream,
            )
    try:
        Follower(client, parts, stream).follow()
    except ServerGone as exc:
        return lost(args.url or "", run_id, out, str(exc), stream)
    except KeyboardInterrupt:
        where = f" --url {args.url}" if args.url else ""
        print(
            f"\nstopped following {run_id}; its batches keep their state. Resume with:\n"
            f"  sluice run --resume {run_id} -o {out}{where}",
            file=stream,
        )
        return 130
    codes = write_results(client, parts, out)
    return report(parts, codes, out, stream)
