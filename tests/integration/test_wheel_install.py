"""The wheel in a fresh virtual environment, outside the checkout: ``pip install`` pulls
its dependencies and ``omnimask demo --quick`` runs every stage from the installed package
(configs, the zoo's models and all). A fresh venv with torch takes minutes to install, so
this runs where OMNIMASK_WHEEL_TEST=1 (CI sets it) and is skipped elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("OMNIMASK_WHEEL_TEST") != "1",
                                reason="set OMNIMASK_WHEEL_TEST=1 to install the wheel into a "
                                       "fresh venv (minutes; CI does)")


@pytest.mark.timeout(2400)
def test_the_installed_wheel_runs_the_quick_demo(omnimask_wheel, tmp_path):
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--no-cache-dir", "--no-compile", str(omnimask_wheel)],
                         capture_output=True, text=True,
                         timeout=1800)
    assert pip.returncode == 0, pip.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "2"
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import omnimask; print(omnimask.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, env=env, timeout=300)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    run = tmp_path / "run"
    demo = subprocess.run([str(venv / "bin" / "omnimask"), "demo", "--quick", "--out",
                           str(run), "num_train=300", "num_val=100", "num_test=100",
                           "num_test_novel=100", "shard_size=10", "vq_steps=20",
                           "speech_units=32", "-q"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=1800)
    assert demo.returncode == 0, demo.stderr[-3000:]
    rep = json.loads((run / "report.json").read_text())
    assert {n: s["status"] for n, s in rep["stages"].items()} == {
        n: "ok" for n in ("data", "inspect", "stats", "pipeline", "preview", "tokenizers",
                          "pretrain", "tasks", "zoo")}
    assert (run / "report.html").is_file()
