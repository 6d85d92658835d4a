"""``omnimask eval generate``: images drawn from captions by a CM3 model, judged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from omnimask.cli import main
from omnimask.train.data.shapesworld.judge import ShapeClassifier


@pytest.fixture(scope="module")
def untrained_judge(tmp_path_factory):
    path = tmp_path_factory.mktemp("judge") / "judge.safetensors"
    torch.manual_seed(0)
    save_file(ShapeClassifier().state_dict(), path)  # only the plumbing is tested here
    return path


def test_eval_generate_draws_judges_and_writes_the_grid(tiny_model_dir, shapes_dir,
                                                        untrained_judge, tmp_path):
    def run(out, *extra):
        return main(["eval", "generate", "--model", str(tiny_model_dir), "--data",
                     str(shapes_dir / "test-novel-*.tar"), "--limit", "5", "--out", str(out),
                     "--set", f"shape_judge={untrained_judge}", "--set", "candidates=2",
                     "--set", "batch=2", "-q", *extra])

    assert run(tmp_path / "a.json", "--examples", str(tmp_path / "ex")) == 0
    r = json.loads((tmp_path / "a.json").read_text())
    m = r["metrics"]
    assert r["task"] == "generate" and r["split"] == "test-novel" and r["n"] == 5
    assert m["images"] == 5 and m["settings"]["candidates"] == 2
    for k in ("judge_shape", "judge_color", "judge_count", "judge_shape_reconstructions",
              "judge_count_originals", "judge_color_originals"):
        assert 0 <= m[k] <= 1, k
    assert 0 <= m["judge_shape_chance"] < 1  # 0 when no object of a named colour is drawn
    # rendered originals show every object of their caption's colours
    assert m["judge_color_originals"] == 1.0
    assert (tmp_path / "ex" / "generated.png").stat().st_size > 1000
    # seeded: the same metrics again; another seed draws other images
    assert run(tmp_path / "b.json") == 0
    assert json.loads((tmp_path / "b.json").read_text())["metrics"] == {
        k: v for k, v in m.items() if k != "examples_png"}
    # parallel drawing (the maskgit objective's sampler), reranked the same way
    assert run(tmp_path / "m.json", "--set", "sampler=maskgit", "--set", "steps=3") == 0
    mm = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert mm["settings"]["sampler"] == "maskgit" and 0 <= mm["judge_color"] <= 1
    assert mm["judge_shape_originals"] == m["judge_shape_originals"]
    # each sampler's grounding: own caption vs another's, on every code (and object codes)
    assert set(m["grounding"]) >= {"image_given_caption", "image_given_other_caption"}
    assert set(mm["grounding"]) == {f"{w}codes_given_{c}" for w in ("", "object_")
                                    for c in ("caption", "other_caption")}
    assert all(v > 0 for v in mm["grounding"].values())
    # infilling the objects' boxes, any-order rounds: the settings say so
    assert run(tmp_path / "i.json", "--set", "sampler=maskgit", "--set", "steps=2", "--set",
               "infill=objects", "--set", "order=random") == 0
    mi = json.loads((tmp_path / "i.json").read_text())["metrics"]
    assert mi["settings"]["infill"] == "objects" and mi["settings"]["order"] == "random"
    assert mi["judge_shape_reconstructions"] == mm["judge_shape_reconstructions"]
    assert run(tmp_path / "c.json", "--set", "sampler=cm3", "--set",
               "infill=objects") == 2  # cm3 cannot infill
    # the default sampler (auto): cm3 for one code per position, maskgit to infill
    assert m["settings"]["sampler"] == "cm3"
    assert run(tmp_path / "a2.json", "--set", "steps=2", "--set", "infill=objects") == 0
    assert json.loads((tmp_path / "a2.json").read_text())["metrics"]["settings"][
        "sampler"] == "maskgit"
    assert run(tmp_path / "c.json", "--set", "sampler=maskgit", "--set", "order=best") == 2
    assert run(tmp_path / "c.json", "--set", "sampler=diffusion") == 2
    # bad settings are one-line errors naming the key
    assert run(tmp_path / "c.json", "--set", "rerank=clip") == 2
    assert run(tmp_path / "c.json", "--set", "guidance=0") == 2
    # where the model runs: recorded; a device this machine lacks is a one-line error
    assert r["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert run(tmp_path / "c.json", "--device", "cuda") == 2
    assert run(tmp_path / "c.json", "--device", "tpu") == 2
    assert run(tmp_path / "d.json", "--device", "cpu") == 0
    assert json.loads((tmp_path / "d.json").read_text())["device"] == "cpu"
