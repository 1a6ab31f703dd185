"""Identifiers and clocks shared by api and worker."""

from __future__ import annotations

import time
import uuid


def new_file_id() -> str:
    """An OpenAI-style file id."""
    return f"file-{uuid.uuid4().hex}"


def new_batch_id() -> str:
    """An OpenAI-style batch id."""
    return f"batch_{uuid.uuid4().hex}"


def new_job_id() -> str:
    """A single job's id (a batch of one)."""
    return f"job_{uuid.uuid4().hex}"


def now() -> float:
    """Wall-clock seconds (stored timestamps)."""
    return time.time()


def unix() -> int:
    """Whole unix seconds, as OpenAI's objects carry them."""
    return int(time.time())
