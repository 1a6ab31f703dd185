"""Flower for Sluice: on the configured (or embedded) Redis, loopback, always behind a login."""

from __future__ import annotations

import ast
import importlib
import os
import secrets
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from sluice.config import Settings
from sluice.queue import broker_url

AUTH_FILE = "flower-auth"
USER = "sluice"


@dataclass(frozen=True)
class FlowerAuth:
    """Basic-auth credentials ("user:password,..."), and where they came from."""

    value: str
    source: str  # "SLUICE_FLOWER_BASIC_AUTH", or the file they are stored in
    generated: bool = False  # made just now (print them once)

    @property
    def first(self) -> tuple[str, str]:
        """The first user and password."""
        user, _, password = self.value.split(",")[0].partition(":")
        return user, password


def credentials(settings: Settings) -> FlowerAuth:
    """SLUICE_FLOWER_BASIC_AUTH, else the stored generated login (made on first use)."""
    if settings.flower_basic_auth:
        return FlowerAuth(settings.flower_basic_auth, "SLUICE_FLOWER_BASIC_AUTH")
    path = Path(settings.data_dir) / AUTH_FILE
    if path.is_file():
        stored = path.read_text().strip()
        if ":" in stored:
            return FlowerAuth(stored, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    value = f"{USER}:{secrets.token_urlsafe(18)}"
    # Created 0600 before anything is written: the password is never readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return FlowerAuth(value, str(path), generated=True)


def flower_url(settings: Settings, port: int | None = None) -> str:
    """Where Flower listens."""
    host = settings.flower_host
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port or settings.flower_port}"


def flower_command(
    settings: Settings, redis_url: str, port: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """Flower's argv and environment (the login travels in the environment, not in `ps`)."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        f"--broker={broker_url(redis_url)}",
        "flower",
        f"--address={settings.flower_host}",
        f"--port={port or settings.flower_port}",
        # Workers that went away leave the list instead of lingering as offline.
        "--purge_offline_workers=60",
    ]
    if settings.log_format == "json":
        # Tornado then installs no handler of its own: Flower's records reach the root
        # handler, JSON like every other Sluice process's (sluice/logs.py).
        argv.append("--logging=none")
    env = {**os.environ, "FLOWER_BASIC_AUTH": credentials(settings).value}
    # The task list shows each task's arguments (batch id, model, count) and its result
    # ({done, total} while PROGRESS); Flower hides both by default. FLOWER_TASKS_COLUMNS wins.
    env.setdefault("FLOWER_TASKS_COLUMNS", "name,uuid,state,args,result,received,runtime,worker")
    return argv, env


def describe(settings: Settings, auth: FlowerAuth, port: int | None = None) -> str:
    """One line for `sluice up`: Flower's URL and how to log in."""
    user, password = auth.first
    if auth.generated:
        login = f"user {user}, password {password} (generated, kept in {auth.source})"
    elif auth.source == "SLUICE_FLOWER_BASIC_AUTH":
        login = "login from SLUICE_FLOWER_BASIC_AUTH"
    else:
        login = f"user {user}, password in {auth.source}"
    return f"Flower at {flower_url(settings, port)} ({login})"


def show_progress(task: Any) -> Any:
    """Flower's pages write run_batch's {done, total} as "7 / 16 done" (the API keeps it)."""
    result = getattr(task, "result", None)
    # Flower hands this hook a copy of its task record. A running task's result is the dict
    # (its list page prints "[object Object]"), a finished one's is the dict's repr (~110
    # characters for run_batch; longer strings are some other task's and stay as they are).
    if isinstance(result, str) and result.startswith("{") and len(result) < 1000:
        try:
            result = ast.literal_eval(result)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return task
    if isinstance(result, dict) and {"done", "total"} <= result.keys():
        task.result = f"{result['done']} / {result['total']} done"
    return task


def run_flower(settings: Settings, redis_url: str, port: int | None = None) -> NoReturn:
    """Serve Flower in this process until SIGINT or SIGTERM, then exit at once.

    Flower keeps nothing worth flushing (no persistence here), and its own exit path hangs on
    its event thread (SIGTERM runs sys.exit, Ctrl-C is swallowed) until a supervisor kills
    it: both signals end the process on the spot, with no traceback.
    """
    argv, env = flower_command(settings, redis_url, port)

    def leave(_sig: int, _frame: FrameType | None) -> None:
        os._exit(0)

    os.environ.update({k: v for k, v in env.items() if k.startswith("FLOWER_")})
    # format_task is a function, so only code (or flowerconfig.py) can set it.
    vars(importlib.import_module("flower.options"))["options"].format_task = show_progress
    signal.signal(signal.SIGINT, leave)
    # Flower installs its SIGTERM handler by this module-level name when it starts.
    vars(importlib.import_module("flower.command"))["sigterm_handler"] = leave
    sys.argv = ["celery", *argv[3:]]
    code = 0
    try:
        importlib.import_module("celery.bin.celery").main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    os._exit(code)
