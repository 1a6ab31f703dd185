"""bench/report.py at tiny sizes: the real stack runs, the report names valid PNGs beside it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "report.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.timeout(150)
def test_report_writes_markdown_and_the_pngs_it_links(tmp_path: Path) -> None:
    """A 300-request run: report.md links every PNG written, each one a real PNG file."""
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--requests", "300", "--seconds", "2", "--clients", "4",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=140, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    text = (out / "report.md").read_text()
    linked = IMAGE_LINK.findall(text)
    assert sorted(linked) == ["latency.png", "occupancy.png", "throughput.png"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(linked)
    for name in linked:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC), f"{name} is not a PNG"
        assert len(data) > 2000, f"{name} is suspiciously small ({len(data)} bytes)"
    # Both phases measured: the p50 TTFT row has a number idle and during bulk, and a ratio.
    row = next(line for line in done.stdout.splitlines() if line.startswith("| TTFT p50"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(re.fullmatch(r"[0-9.]+x?", c) for c in cells[1:]), row
    assert row in text, "the printed summary is the report's"
    rate = next(line for line in text.splitlines() if line.startswith("| bulk requests/s"))
    assert float(rate.strip("|").split("|")[2]) > 0, rate
