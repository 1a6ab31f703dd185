"""`sluice keys create|list|revoke` as a user runs them, on a real SQLite database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sluice.config import load_settings
from sluice.db import Database
from sluice.local_key import client_key, ensure_local_key, key_path
from sluice.store.keys import find_key

SLUICE = [sys.executable, "-m", "sluice.cli"]


def _sluice(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["SLUICE_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [*SLUICE, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_create_list_revoke(tmp_path: Path) -> None:
    assert _sluice(tmp_path, "db", "upgrade").returncode == 0
    made = _sluice(
        tmp_path, "keys", "create", "--owner", "team-a", "--rpm", "60", "--expires-in", "30d"
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("sk-sluice-") and len(key) > 40
    assert "shown only now" in made.stderr

    listed = _sluice(tmp_path, "keys", "list")
    assert listed.returncode == 0
    assert key[:14] in listed.stdout and key not in listed.stdout
    assert "team-a" in listed.stdout and "active" in listed.stdout and "rpm 60" in listed.stdout

    db = Database(f"sqlite:///{tmp_path / 'sluice.db'}")
    try:
        info = find_key(db, key)
        assert info is not None and info.owner == "team-a" and info.rpm_limit == 60
        assert _sluice(tmp_path, "keys", "revoke", key[:14]).returncode == 0
        assert find_key(db, key) is None
    finally:
        db.dispose()
    assert "revoked" in _sluice(tmp_path, "keys", "list").stdout


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    assert _sluice(tmp_path, "db", "upgrade").returncode == 0
    bad = _sluice(tmp_path, "keys", "create", "--owner", "two words")
    assert bad.returncode == 1 and "owner must be" in bad.stderr
    assert (
        _sluice(tmp_path, "keys", "create", "--owner", "a", "--expires-in", "soon").returncode == 2
    )
    missing = _sluice(tmp_path, "keys", "revoke", "key_nope")
    assert missing.returncode == 1 and "no key with id" in missing.stderr


def test_without_tables_the_cli_says_to_upgrade(tmp_path: Path) -> None:
    out = _sluice(tmp_path, "keys", "list")
    assert out.returncode == 1 and "sluice db upgrade" in out.stderr
    assert "SELECT" not in out.stderr


def test_local_key_is_private_reused_and_replaced_when_revoked(tmp_path: Path) -> None:
    from sluice.migrate import upgrade
    from sluice.store.keys import revoke_key

    settings = load_settings(data_dir=tmp_path)
    upgrade(settings.resolved_database_url)
    db = Database(settings.resolved_database_url)
    try:
        first = ensure_local_key(settings, db)
        assert key_path(settings).stat().st_mode & 0o777 == 0o600
        assert ensure_local_key(settings, db) == first  # a restart keeps the key
        assert client_key(settings) == first
        info = find_key(db, first)
        assert info is not None and info.admin
        revoke_key(db, info.id)
        second = ensure_local_key(settings, db)
        assert second != first and find_key(db, second) is not None
    finally:
        db.dispose()
    # SLUICE_API_KEY wins over the file.
    assert client_key(load_settings(data_dir=tmp_path, api_key="sk-other")) == "sk-other"
