"""finetune -> RUN/model -> eval -> Python API, end to end on a tiny model, per task."""

from __future__ import annotations

import json

import pytest
import torch

import omnimask
from omnimask.cli import main
from omnimask.config import load_config
from omnimask.train.finetune import FinetuneConfig, Finetuning


def _finetune(tiny_model_dir, shapes_dir, out, task: str, **kw):
    cfg = load_config(FinetuneConfig, None, **{
        "out": str(out), "task": task, "init": str(tiny_model_dir),
        "data": {"train": [str(shapes_dir / "train-*.tar")],
                 "val": [str(shapes_dir / "test-novel-*.tar")], "val_limit": 12},
        "trainer": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "checkpoint_every": 3,
                    "warmup_steps": 1, "log_every": 2, "lr": 1e-3, "tensorboard": False},
        **kw})
    return Finetuning(cfg, progress=False).fit()


@pytest.fixture(scope="module")
def vqa_run(tiny_model_dir, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "vqa"
    return out, _finetune(tiny_model_dir, shapes_dir, out, "vqa",
                          tasks={"vqa": {"questions_per_sequence": 3}})


def test_finetune_exports_the_best_model_with_only_its_head(vqa_run):
    out, summary = vqa_run
    assert summary["status"] == "done" and summary["step"] == 6
    best = json.loads((out / "model" / "metrics.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["metrics"]["accuracy"] for r in rows if r.get("split") == "val"}
    assert set(val) == {0, 3, 6}
    # the exported step is the best validated one after training started
    assert best["step"] in (3, 6)
    assert best["score"] == pytest.approx(max(val[3], val[6]), abs=1e-5)
    model = omnimask.load(out / "model")
    assert set(model.heads) == {"vqa"} and model.head_configs["vqa"].answers


def test_eval_cli_writes_the_metrics_json_and_examples(vqa_run, shapes_dir, tmp_path, capsys):
    out, _ = vqa_run
    js = tmp_path / "vqa.json"
    assert main(["eval", "vqa", "--model", str(out / "model"), "--data",
                 str(shapes_dir / "test-novel-*.tar"), "--limit", "10", "--out", str(js),
                 "--examples", str(tmp_path / "ex"), "-q"]) == 0
    r = json.loads(js.read_text())
    assert (r["task"], r["split"], r["n"]) == ("vqa", "test-novel", 10)
    m = r["metrics"]
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["prior_baseline"] <= 1
    assert set(m["per_type"]) <= {"color", "shape", "size", "count", "exists", "relation"}
    assert (tmp_path / "ex" / "vqa_examples.png").stat().st_size > 10_000
    assert "per_type.color" in capsys.readouterr().out


def test_answer_api_takes_paths_arrays_and_tensors(vqa_run, tmp_path):
    from PIL import Image

    out, _ = vqa_run
    model = omnimask.load(out / "model")
    img = (torch.rand(3, 64, 64) * 255).to(torch.uint8)
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    a = model.answer(tmp_path / "a.png", "what color is the circle?")
    assert a["answer"] in model.head_configs["vqa"].answers and 0 <= a["score"] <= 1
    many = model.answer([img, img.permute(1, 2, 0).numpy()], ["how many objects are there?"] * 2)
    assert len(many) == 2 and many[0] == many[1]
    assert model.answer(img, "what color is the circle?") == a  # a path and a tensor: one image


def test_bad_finetune_inputs_fail_naming_the_setting(tiny_model_dir, shapes_dir, tmp_path):
    from omnimask.errors import ConfigError

    with pytest.raises(ConfigError, match="tasks.vqa"):
        _finetune(tiny_model_dir, shapes_dir, tmp_path / "a", "vqa",
                  tasks={"vqa": {"questions_per_sequence": -1}})
    with pytest.raises(ConfigError, match="init"):
        _finetune(tmp_path / "nowhere", shapes_dir, tmp_path / "b", "vqa")
