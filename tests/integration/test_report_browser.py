"""The demo's report.html in a real headless Chromium: every image loads and the page has a
sane height (tools/screenshot_report.py). CI installs Debian's chromium; a machine without
it skips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "screenshot_report.py"
sys.path.insert(0, str(TOOL.parent))
from screenshot_report import chromium  # noqa: E402
from unit.test_demo_report import _report_dir  # noqa: E402

pytestmark = pytest.mark.skipif(chromium() is None, reason="no chromium on PATH")


def _check(report: Path, png: Path | None = None) -> tuple[int, dict]:
    args = [sys.executable, str(TOOL), str(report)] + (["--png", str(png)] if png else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    return r.returncode, json.loads(r.stdout)


def test_every_image_of_the_report_loads_in_chromium(tmp_path):
    from omnimask.report_html import render_html

    (tmp_path / "report.html").write_text(render_html(_report_dir(tmp_path), tmp_path))
    rc, r = _check(tmp_path / "report.html", tmp_path / "shot.png")
    assert rc == 0 and r["images"] == 1 and r["broken"] == 0
    assert 200 < r["height"] < 3000  # the 1500-px-wide figure shrank to the window
    assert (tmp_path / "shot.png").stat().st_size > 1000
    # the check sees a broken image (the probe works)
    (tmp_path / "bad.html").write_text(render_html("![gone](gone.png)\n", tmp_path))
    rc, r = _check(tmp_path / "bad.html")
    assert rc == 1 and r["broken"] == 1
