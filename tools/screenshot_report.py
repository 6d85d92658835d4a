#!/usr/bin/env python3
"""Open a report.html in headless Chromium: count its images and the broken ones, measure
the page height, and optionally save a screenshot.

    python tools/screenshot_report.py runs/demo/report.html [--png OUT.png] [--width 1280]

Prints one JSON line: {"images": N, "broken": M, "height": H, "screenshot": PATH|null}.
Exits 1 when an image is broken; 2 when Chromium is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
         "document.title='probe '+im.length+' '+im.filter(i=>!i.complete||!i.naturalWidth)"
         ".length+' '+document.documentElement.scrollHeight;});</script>")


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                        "google-chrome")) if p), None)


def _run(exe: str, args: list[str]) -> str:
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--virtual-time-budget=10000"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=180).stdout


def check(report: Path, png: Path | None = None, width: int = 1280) -> dict:
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        # a probed copy beside the original, so relative image paths still resolve
        probe = report.with_name(f".probe-{Path(tmp).name}.html")
        probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
        try:
            dom = _run(exe, ["--dump-dom", probe.resolve().as_uri()])
        finally:
            probe.unlink(missing_ok=True)
    m = re.search(r"<title>probe (\d+) (\d+) (\d+)</title>", dom)
    if m is None:
        raise RuntimeError(f"{report}: the page did not finish loading in Chromium")
    images, broken, height = map(int, m.groups())
    if png is not None:
        _run(exe, [f"--window-size={width},{min(max(height, 600), 16000)}",
                   f"--screenshot={png.resolve()}", report.resolve().as_uri()])
    return {"images": images, "broken": broken, "height": height,
            "screenshot": str(png) if png is not None and png.is_file() else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path)
    p.add_argument("--png", type=Path)
    p.add_argument("--width", type=int, default=1280)
    a = p.parse_args()
    try:
        r = check(a.report, a.png, a.width)
    except FileNotFoundError as e:
        print(f"screenshot_report: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r))
    return 1 if r["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
