"""The demo's task section: metrics beside baselines and targets, and the time-cap note."""

from pathlib import Path

from omnimask.demo_tasks import baseline, cut_note, report_lines, results_rows
from omnimask.demo_zoo import report_lines as zoo_lines


def _tasks(steps: int) -> dict:
    vqa = {"n": 10, "metrics": {"accuracy": 0.5, "prior_baseline": 0.4,
                                "per_type": {"color": 0.8}, "prior_per_type": {"color": 0.2}}}
    ret = {"n": 20, "metrics": {"t2i_r10": 0.95, "t2i_r1": 0.3}}
    runs = {"vqa": {"tasks": ["vqa"], "steps": steps, "max_steps": 10, "status": "done",
                    "train_seconds": 2.0},
            "multitask": {"tasks": ["retrieval", "caption"], "steps": 4, "max_steps": 4,
                          "status": "done", "train_seconds": 1.0}}
    return {"runs": runs, "train_seconds": 3.0, "examples": ["examples/vqa_examples.png"],
            "eval": {"vqa": {"test": vqa}, "retrieval": {"test-novel": ret}}}


def test_rows_hold_value_baseline_target_and_mark():
    rows = {(r["metric"], r["split"]): r for r in results_rows(_tasks(10))}
    assert set(rows) == {("accuracy", "test"), ("per_type.color", "test"),
                         ("t2i_r1", "test-novel"), ("t2i_r10", "test-novel")}
    acc, color = rows["accuracy", "test"], rows["per_type.color", "test"]
    assert (acc["value"], acc["baseline"], acc["target"], acc["pass"]) == (0.5, 0.4, 0.7, False)
    assert (color["baseline"], color["pass"]) == (0.2, True)
    r10, r1 = rows["t2i_r10", "test-novel"], rows["t2i_r1", "test-novel"]
    assert (r10["baseline"], r10["pass"]) == (10 / 20, True)  # chance: k / gallery size
    assert (r1["baseline"], r1["pass"]) == (1 / 20, None)  # no demo-tier target


def test_chance_recall_is_capped_at_one():
    assert baseline({"n": 4, "metrics": {}}, "r10_chance") == 1.0
    assert baseline({"n": 4, "metrics": {}}, None) is None


def test_the_report_says_when_the_time_cap_cut_a_stage():
    assert cut_note("pretraining", {"steps": 900, "max_steps": 900}) == []
    note = cut_note("pretraining", {"steps": 435, "max_steps": 900})
    assert "step 435 of 900" in note[0] and note[-1] == ""  # a blank line before any table
    md = "\n".join(report_lines(_tasks(6)))
    assert "stopped vqa fine-tuning at step 6 of 10" in md
    assert "vqa 6 of 10 steps; retrieval + caption 4 of 4 steps; 3 s" in md
    assert "| VQA accuracy | test | 0.500 | 0.400 | >= 0.70 | short |" in md
    assert "![examples/vqa_examples.png](examples/vqa_examples.png)" in md
    assert "stopped" not in "\n".join(report_lines(_tasks(10)))


def test_the_zoo_table_sets_each_zoo_metric_beside_the_demo_one():
    zoo = {"cache": "/r/zoo", "eval": {
        "vqa": {"model": "omnimask/x-vqa", "result": {"n": 10, "metrics": {
            "accuracy": 0.75, "per_type": {"color": 0.9}}}},
        "segment": {"model": "omnimask/x-seg", "result": {"n": 10, "metrics": {"miou": 0.6}}}}}
    md = "\n".join(zoo_lines(zoo, _tasks(10)))
    assert "| VQA accuracy | 0.500 | 0.750 | >= 0.70 | omnimask/x-vqa |" in md
    assert "| VQA colour | 0.800 | 0.900 | >= 0.75 | omnimask/x-vqa |" in md
    assert "| semantic mIoU |  | 0.600 | >= 0.50 | omnimask/x-seg |" in md  # no demo model
    assert "VQA count" not in md  # a metric neither evaluation has


def _report_dir(tmp_path):
    """A report folder: a figure and markdown with headings, a table and the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(30, 2))  # wider than any window
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "wide.png", dpi=50)
    plt.close(fig)
    md = ("# omnimask demo\n\n| stage | status | seconds |\n|---|---|---|\n| data | ok | 1.0 |\n"
          "\n| metric | value | |\n|---|---|---|\n| VQA accuracy | 0.5 | short |\n"
          "| R@10 | 0.9 | pass |\n\n![wide.png](wide.png)\n")
    return md


def test_the_html_report_is_rendered_and_self_contained(tmp_path):
    from omnimask.report_html import render_html

    page = render_html(_report_dir(tmp_path), tmp_path)
    assert "<h1>omnimask demo</h1>" in page and "| stage |" not in page
    assert page.count("<table>") == 2 and "<td>data</td>" in page
    assert '<td class="short">short</td>' in page and '<td class="pass">pass</td>' in page
    assert 'src="data:image/png;base64,' in page and 'src="wide.png"' not in page
    assert "img{max-width:100%" in page  # wide figures shrink to the page


def test_training_curves_draw_every_objective(tmp_path):
    import json

    from PIL import Image

    from omnimask.report_html import training_curves

    assert training_curves(tmp_path, tmp_path / "c.png") is None  # nothing to draw
    (tmp_path / "pretrain").mkdir()
    rows = [{"step": 0, "split": "val", "losses": {"mlm": 7.0, "itm": 0.7}}]
    rows += [{"step": s, "split": "train", "objective": o, o: 7.0 / s, "loss": 7.0 / s}
             for s in range(1, 40) for o in ("mlm", "itm")]
    rows += [{"step": 40, "split": "val", "losses": {"mlm": 3.0, "itm": 0.6}}]
    (tmp_path / "pretrain" / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows) + "\n{torn")
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"step": s, "split": "train", "objective": "vqa", "loss": 3.0 / s}) for s in range(1, 9)))
    out = training_curves(tmp_path, tmp_path / "c.png", {"vqa": tmp_path / "ft"})
    w, h = Image.open(out).size
    assert out == tmp_path / "c.png" and w > 2 * h


def test_pretraining_rows_sit_beside_their_target_and_chance():
    from omnimask.demo import RATIO_TARGET, generation_lines
    from omnimask.train.evaluate import summary_table

    val = {"mlm": {"step0": 7.0, "final": 3.5, "ratio": 0.5},
           "itm": {"step0": 0.7, "final": 0.69, "ratio": 0.986}}
    md = summary_table({"val": val}, RATIO_TARGET)
    assert "| mlm | 7.0000 | 3.5000 | 0.5 | <= 0.70 | pass |" in md
    assert "| itm | 0.7000 | 0.6900 | 0.986 | <= 0.70 | short |" in md
    assert "target" not in summary_table({"val": val})  # the CLI's table has no target
    x = {"captions_scored": 32, "caption_colour_precision": 0.5,
         "chance_caption_colour_precision": 0.3, "caption_shape_precision": 0.4,
         "chance_caption_shape_precision": 0.2, "caption_object_precision": 0.25,
         "chance_caption_object_precision": 0.05, "captions_naming_every_object": 3,
         "chance_captions_naming_every_object": 0, "images_judged": 16,
         "images_colour_present": 0.9, "images_shape_hit": 0.4, "images_shape_chance": 0.19,
         "reconstructions_shape_hit": 0.3, "reconstructions_shape_chance": 0.18}
    md = "\n".join(generation_lines(x))
    assert "| CM3 captions of 32 val images: of the objects named, right colour | 0.500 | " \
           "0.300 |  |  |" in md
    assert "| CM3 captions naming every object (of 32) | 3 | 0 |  |  |" in md
    assert "the named shape (judge) | 0.400 | 0.190 | >= 0.35 | pass |" in md
    assert "| VQ reconstructions of the same images: the named shape (judge) | 0.300 | " \
           "0.180 |  |  |" in md
    real = generation_lines({"captions_scored": 4})  # not ShapesWorld: no zero scores
    assert "no object scores" in real[-1] and "|" not in real[-1]


def test_image_tables_label_rows_and_caption_every_image(tmp_path):
    """The report's figures: a title, a label per row and readable captions (the sheet is
    several times taller than one text line of the old 8-px captions)."""
    import numpy as np
    from PIL import Image

    from omnimask.train.data.preview import contact_sheet
    from omnimask.train.figures import _wrapped, image_table

    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(5)]
    out = image_table([("top", ims), ("bottom", ims[:3])], tmp_path / "t.png", "title",
                      [[], ["a caption"] * 3], cell=1.0, dpi=50)
    w, h = Image.open(out).size
    assert (w, h) > (5 * 40, 2 * 40)  # five 1-inch cells at 50 dpi, two rows
    assert _wrapped("word " * 200, 20).count("\n") == 5 and _wrapped("x " * 200, 20).endswith("...")
    sheet = contact_sheet([{"image": ims[0], "seg": np.zeros((16, 16), int),
                            "inst": np.ones((16, 16), int), "caption": "a red square"}] * 6,
                          tmp_path / "s.png", cols=4, title="train samples")
    w, h = Image.open(sheet).size
    assert w > 2.5 * h  # two rows of four image | semantic | instance triptychs


def test_runs_start_from_the_model_their_settings_name(tmp_path, monkeypatch):
    """VQA starts from the retrieval + caption model (``vqa_init: multitask``) or from the
    pretrained one; the final retrieval + caption run from the VQA model (the first run's
    when VQA is skipped) and serves those tasks; segmentation from the last model of that
    chain or the pretrained one (``segment_init``); ITM is trained only with ``itm``; the
    word-pair caption expert is off only in a run whose captions a later run serves."""
    import omnimask.train.evaluate_task as evaluate_task
    import omnimask.train.export as export
    import omnimask.train.finetune as finetune
    from omnimask.config import TASK_RUNS
    from omnimask.demo_tasks import RUNS, stage_tasks

    seen = {}

    class FakeRun:
        def __init__(self, cfg, progress=True):
            self.cfg = cfg

        def fit(self):
            seen[Path(self.cfg.out).name] = self.cfg
            return {"step": 2, "status": "done", "train_seconds": 0.0,
                    "model": f"{self.cfg.out}/model"}

    monkeypatch.setattr(export, "export_run", lambda src, dst: dst)
    monkeypatch.setattr(finetune, "Finetuning", FakeRun)
    monkeypatch.setattr(evaluate_task, "evaluate_model", lambda *a, **k: {"metrics": {}})
    pre = str(tmp_path / "pretrain" / "model")
    for vqa_init, seg_init, itm in (("multitask", "chain", False),
                                    ("pretrained", "pretrained", True)):
        seen.clear()
        steps = {"vqa": 2, "multitask": 2, "final": 2, "segment": 2}
        x = stage_tasks(steps, 1.0, tmp_path, quick=False, progress=False, itm=itm,
                        vqa_init=vqa_init, segment_init=seg_init)
        r = x["runs"]
        assert r["multitask"]["init"] == pre
        assert r["vqa"]["init"] == (r["multitask"]["model"] if vqa_init == "multitask" else pre)
        assert r["final"]["init"] == r["vqa"]["model"]
        assert r["segment"]["init"] == (r["final"]["model"] if seg_init == "chain" else pre)
        assert x["models"] == {"retrieval": r["final"]["model"], "caption": r["final"]["model"],
                               "vqa": r["vqa"]["model"], "segment": r["segment"]["model"]}
        assert seen["finetune-final"].task == seen["finetune"].task == "multitask"
        for run in ("finetune", "finetune-final"):
            rc = seen[run].heads.get("retrieval", {})
            assert (rc.get("itm_weight"), rc.get("rerank_k")) == ((None, None) if itm
                                                                  else (0, 0))
        debias = {run: seen[run].tasks["caption"]["debias_prior"]
                  for run in ("finetune", "finetune-final")}
        assert debias == {"finetune": 0, "finetune-final": 10.0}
    # without VQA the final run starts from the first; without it the first one serves
    x = stage_tasks({"multitask": 2, "final": 2}, 1.0, tmp_path, quick=False, progress=False)
    assert x["runs"]["final"]["init"] == x["runs"]["multitask"]["model"]
    x = stage_tasks({"multitask": 2, "vqa": 2, "segment": 2}, 1.0, tmp_path, quick=False,
                    progress=False)
    assert x["models"]["caption"] == x["runs"]["multitask"]["model"]
    assert seen["finetune"].tasks["caption"]["debias_prior"] == 10.0
    assert x["runs"]["segment"]["init"] == x["runs"]["vqa"]["model"]
    assert tuple(r[0] for r in RUNS) == TASK_RUNS  # the names run_settings is checked against
    # run_settings reach their run only, applied after the chain's own (STEP_SETTINGS)
    seen.clear()
    stage_tasks({"multitask": 2, "final": 2}, 1.0, tmp_path, quick=False, progress=False,
                run_settings={"final": ["train_image_encoder=true",
                                        "tasks.caption.hue_copy=0.5"],
                              "multitask": ["tasks.caption.debias_prior=3"]})
    assert seen["finetune-final"].train_image_encoder is True
    assert seen["finetune-final"].tasks["caption"]["hue_copy"] == 0.5
    assert seen["finetune"].train_image_encoder is False
    assert "hue_copy" not in seen["finetune"].tasks["caption"]
    assert seen["finetune"].tasks["caption"]["debias_prior"] == 3
