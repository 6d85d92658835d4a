"""tools/gpu_check.sh at CPU size (TINY=1): every stage runs and writes what it promises.
It measures nothing here; on a GPU the same script is the prepared device check."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_runs_every_stage_at_cpu_size(shapes_dir, tiny_tokenizers, tmp_path):
    from omnimask.registry import TOKENIZERS

    image = tmp_path / "image16"  # the default tokenizer (16 x 16 codes), two steps
    TOKENIZERS.get("image").train([str(shapes_dir / "train-*.tar")], str(image),
                                  ["max_steps=2", "batch_size=8"], progress=False)
    out = tmp_path / "check"
    env = {**os.environ, "TINY": "1", "OMNIMASK": f"{sys.executable} -m omnimask.cli",
           "STAGES": "bench compile draw", "BRING": str(tmp_path / "bring")}
    r = subprocess.run(["bash", "tools/gpu_check.sh", str(out), str(tiny_tokenizers / "text"),
                        str(image)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    log = (out / "stages.log").read_text()
    for stage in ("bench trunk", "bench trunk --compile", "data", "pretrain", "export",
                  "generate (boxes)", "generate (full)", "bring the model",
                  "bring the results"):
        assert f"{stage}: exit 0" in log, log
    for name in ("trunk.json", "trunk-compile.json"):
        bench = json.loads((out / name).read_text())
        assert bench["variable"]["ratio"] > 0 and bench["full_length"]["omnimask"]["attention"]
    assert bench["config"]["compile"]
    for mode in ("boxes", "full"):
        m = json.loads((out / f"generate-{mode}.json").read_text())["metrics"]
        assert 0 <= m["judge_shape"] <= 1 and "judge_shape_chance" in m
        assert (out / f"drawn-{mode}" / "generated.png").is_file()
    # what travels back: few files under 16 MiB, the model rebuilt from its parts loads
    bring = sorted((tmp_path / "bring").iterdir())
    assert len(bring) <= 8 and all(p.stat().st_size <= 15 * 2 ** 20 for p in bring)
    with tarfile.open(tmp_path / "bring" / "results.tar.gz") as t:
        names = t.getnames()
    assert "./trunk.json" in names and "./drawn-full/generated.png" in names
    assert not any(n.startswith(("./data/", "./run/checkpoints", "./model/", "./run/corpus"))
                   for n in names)
    parts = b"".join(p.read_bytes() for p in bring if p.name.startswith("model-bf16.tar.part-"))
    with tarfile.open(fileobj=io.BytesIO(parts)) as t:
        t.extractall(tmp_path / "models", filter="data")
    import omnimask

    drawn = omnimask.load(tmp_path / "models" / "drawn")
    ref = omnimask.load(out / "model")
    for (name, a), (_, b) in zip(drawn.state_dict().items(), ref.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b.to(torch.bfloat16).to(b.dtype)), name


def test_gpu_check_refuses_a_missing_tokenizer(tmp_path):
    r = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path / "o"), str(tmp_path / "no"),
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr
