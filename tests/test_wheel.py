"""`pip install .` (not editable) into a fresh virtualenv: `sluice db upgrade` finds its
migrations in the installed package, away from any source checkout."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

from alembic.script import ScriptDirectory

from sluice.migrate import alembic_config

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "alembic.ini", "sluice", "api", "worker", "migrations")


def test_plain_install_upgrades_a_database(tmp_path: Path) -> None:
    # A copy of the source: the build's scratch directories stay out of the shared checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The dependencies come from this environment's site-packages (appended after the new
    # venv's own, and without running its .pth files, so the editable sluice is not seen):
    # nothing is downloaded.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    shutil.rmtree(src)  # no checkout left to lean on

    work = tmp_path / "elsewhere"
    work.mkdir()
    db = work / "fresh.db"
    env = {
        "PATH": "/usr/bin:/bin",
        "SLUICE_DATA_DIR": str(work),
        "SLUICE_DATABASE_URL": f"sqlite:///{db}",
    }
    where = subprocess.run(
        [
            py,
            "-c",
            "import sluice, sluice.migrate as m; print(sluice.__file__); print(m.migrations_dir())",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(p.startswith(str(site)) for p in where), where
    up = subprocess.run(
        [venv / "bin" / "sluice", "db", "upgrade"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert up.returncode == 0, up.stderr
    assert "database at head" in up.stdout
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with sqlite3.connect(db) as conn:
        assert conn.execute("select version_num from alembic_version").fetchall() == [(head,)]
