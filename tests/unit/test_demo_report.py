"""The demo's task section: metrics beside baselines and targets, and the time-cap note."""

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
