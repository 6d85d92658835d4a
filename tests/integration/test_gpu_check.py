"""tools/gpu_check.sh at CPU size (TINY=1): every stage runs and writes what it promises.
It measures nothing here; on a GPU the same script is the prepared device check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_runs_every_stage_at_cpu_size(shapes_dir, tiny_tokenizers, tmp_path):
    from omnimask.registry import TOKENIZERS

    image = tmp_path / "image16"  # the default tokenizer (16 x 16 codes), two steps
    TOKENIZERS.get("image").train([str(shapes_dir / "train-*.tar")], str(image),
                                  ["max_steps=2", "batch_size=8"], progress=False)
    out = tmp_path / "check"
    env = {**os.environ, "TINY": "1", "OMNIMASK": f"{sys.executable} -m omnimask.cli",
           "STAGES": "bench compile draw"}
    r = subprocess.run(["bash", "tools/gpu_check.sh", str(out), str(tiny_tokenizers / "text"),
                        str(image)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    log = (out / "stages.log").read_text()
    for stage in ("bench trunk", "bench trunk --compile", "data", "pretrain", "export",
                  "generate (boxes)", "generate (full)"):
        assert f"{stage}: exit 0" in log, log
    for name in ("trunk.json", "trunk-compile.json"):
        bench = json.loads((out / name).read_text())
        assert bench["variable"]["ratio"] > 0 and bench["full_length"]["omnimask"]["attention"]
    assert bench["config"]["compile"]
    for mode in ("boxes", "full"):
        m = json.loads((out / f"generate-{mode}.json").read_text())["metrics"]
        assert 0 <= m["judge_shape"] <= 1 and "judge_shape_chance" in m
        assert (out / f"drawn-{mode}" / "generated.png").is_file()


def test_gpu_check_refuses_a_missing_tokenizer(tmp_path):
    r = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path / "o"), str(tmp_path / "no"),
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr
