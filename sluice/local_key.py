"""The local admin key of an embedded stack: DATA_DIR/api-key (mode 0600), read by clients."""

from __future__ import annotations

import os
from pathlib import Path

from sluice.config import Settings
from sluice.db import Database
from sluice.store.keys import create_key, find_key

KEY_FILE = "api-key"
LOCAL_OWNER = "local"


def key_path(settings: Settings) -> Path:
    """Where `sluice up` keeps its key."""
    return settings.data_dir / KEY_FILE


def read_local_key(settings: Settings) -> str | None:
    """The data directory's key, if one was written (unreadable: None)."""
    try:
        text = key_path(settings).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def client_key(settings: Settings) -> str | None:
    """The key a client sends: SLUICE_API_KEY, else the data directory's local key."""
    return settings.api_key or read_local_key(settings)


def ensure_local_key(settings: Settings, db: Database) -> str:
    """The live local admin key, created (and written 0600) when missing or revoked."""
    path = key_path(settings)
    current = read_local_key(settings)
    if current is not None and find_key(db, current) is not None:
        return current
    key, _ = create_key(db, owner=LOCAL_OWNER, name="sluice up (local admin)", admin=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a new file created 0600 and renamed: the key is never readable by others,
    # not even for the moment between create and chmod.
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key + "\n")
    os.replace(tmp, path)
    return key
