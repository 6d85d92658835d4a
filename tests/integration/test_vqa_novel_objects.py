"""tools/vqa_novel_objects.py: VQA accuracy on novel vs seen colour-shape pairs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from vqa_novel_objects import main, read_shards, split_by_novelty  # noqa: E402


class Oracle:
    """Answers from a lookup of the truth; ``wrong`` answers 'no' instead."""

    def __init__(self, truth: dict[str, str], wrong: bool = False) -> None:
        self.truth, self.wrong = truth, wrong

    def answer(self, images, questions):
        return [{"answer": "no" if self.wrong else self.truth[q], "score": 1.0}
                for q in questions]


def test_split_counts_every_single_object_question_once(shapes_dir):
    samples = read_shards([str(shapes_dir / "test-novel-*.tar")])
    assert len(samples) == 30
    types = {"shape", "color", "size"}
    novel = seen = 0
    truth = {}
    for _, meta, qa in samples:
        objs = {o["id"]: o for o in meta["objects"]}
        assert any(o["novel"] for o in objs.values())  # every test-novel image has one
        for q in qa:
            if q["type"] in types and len(q["grounding"][0]) == 1:
                novel += objs[q["grounding"][0][0]]["novel"]
                seen += not objs[q["grounding"][0][0]]["novel"]
            truth[q["question"]] = q["answer"]
    # an oracle answers all right (per sample: one question text may recur across images)
    counted = 0
    for s in samples:
        res = split_by_novelty(Oracle({q["question"]: q["answer"] for q in s[2]}), [s], types)
        assert all(v["accuracy"] == 1.0 for v in res["accuracy"].values())
        counted += sum(v["n"] for k, v in res["accuracy"].items() if k in ("novel", "seen"))
    assert novel > 0 and seen > 0 and counted == novel + seen
    res = split_by_novelty(Oracle(truth, wrong=True), samples, types)
    acc = res["accuracy"]
    assert (acc["novel"]["n"], acc["seen"]["n"]) == (novel, seen)
    assert all(v["accuracy"] == 0 for v in acc.values())
    assert acc["novel"]["n"] == sum(v["n"] for k, v in acc.items() if k.startswith("novel, "))
    # every wrong answer on a novel object is tallied (up to the ten most frequent kinds)
    assert sum(e["count"] for e in res["novel_errors"]) <= novel
    assert all(e["answer"] == "no" for e in res["novel_errors"])


def test_cli_refuses_a_model_without_vqa_head(tiny_model_dir, shapes_dir, tmp_path):
    with pytest.raises(SystemExit, match="no vqa head"):
        main(["--model", str(tiny_model_dir), "--data", str(shapes_dir / "test-novel-*.tar")])
    with pytest.raises(SystemExit, match="no shard matches"):
        main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "none-*.tar")])
    assert not list(tmp_path.iterdir())  # nothing written
