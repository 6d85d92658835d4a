"""Converters read files in the real COCO / VQA v2 / caption-table formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from omnimask.config import DataConfig
from omnimask.errors import DataError
from omnimask.registry import CONVERTERS
from omnimask.train.data.pipeline import ShardLoader


def _jpeg(path, seed, size=(80, 60)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")


@pytest.fixture
def coco(tmp_path):
    img = tmp_path / "val2014"
    img.mkdir()
    names = {1: "COCO_val2014_000000000001.jpg", 2: "COCO_val2014_000000000002.jpg",
             3: "COCO_val2014_000000000003.jpg", 4: "COCO_val2014_000000000004.jpg"}
    for i in (1, 2):
        _jpeg(img / names[i], i)
    (img / names[3]).write_bytes(b"\xff\xd8 this is not a jpeg")  # corrupt; 4 is missing
    caps = {"info": {}, "licenses": [],
            "images": [{"id": i, "file_name": n, "width": 80, "height": 60} for i, n in names.items()],
            "annotations": [{"id": 10 + k, "image_id": i, "caption": f"caption {k} of {i}"}
                            for k, i in enumerate([1, 1, 2, 3, 4])]}
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    qs = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
          "questions": [{"image_id": 1, "question": "What color is it?", "question_id": 100},
                        {"image_id": 2, "question": "Is it noisy?", "question_id": 200},
                        {"image_id": 2, "question": "How many?", "question_id": 201}]}
    ans = {"info": {}, "annotations": [
        {"question_id": 100, "image_id": 1, "question_type": "what color is the",
         "answer_type": "other", "multiple_choice_answer": "gray",
         "answers": [{"answer": "gray", "answer_confidence": "yes", "answer_id": k}
                     for k in range(1, 11)]},
        {"question_id": 200, "image_id": 2, "question_type": "is it", "answer_type": "yes/no",
         "multiple_choice_answer": "yes",
         "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)]},
        {"question_id": 201, "image_id": 2, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "2",
         "answers": [{"answer": "2", "answer_confidence": "maybe", "answer_id": k} for k in range(1, 11)]}]}
    (tmp_path / "questions.json").write_text(json.dumps(qs))
    (tmp_path / "answers.json").write_text(json.dumps(ans))
    return tmp_path


def _read(d, processors):
    cfg = DataConfig(shards=[str(d / "*.tar")], processors=processors, batch_size=8, shuffle_buffer=0)
    loader = ShardLoader(cfg, 0, 1)
    batches = list(loader)
    assert loader.stats()["bad"] == 0
    return {k: i for b in batches for i, k in enumerate(b["__key__"])}, batches


def test_coco_with_vqa(coco):
    out = coco / "shards"
    e = CONVERTERS.create("coco", images=str(coco / "val2014"), captions=str(coco / "captions.json"),
                          out=str(out), split="val", questions=str(coco / "questions.json"),
                          answers=str(coco / "answers.json"), progress=False)
    assert e["num"] == 2 and e["skipped"] == 2  # one corrupt, one missing image
    _, (b,) = _read(out, ["image", "text", "qa", "meta"])
    assert b["__key__"] == ["coco-000000000001", "coco-000000000002"]
    assert b["image"].shape == (2, 3, 60, 80)
    assert b["captions"][0] == ["caption 0 of 1", "caption 1 of 1"]
    q = b["qa"][1]
    assert [x["question"] for x in q] == ["Is it noisy?", "How many?"]
    assert q[1]["answer"] == "2" and q[1]["type"] == "number" and len(q[1]["answers"]) == 10
    assert b["meta"][0]["image_id"] == 1 and b["meta"][0]["source"] == "coco"


def test_coco_captions_only_and_bad_files(coco):
    e = CONVERTERS.create("coco", images=str(coco / "val2014"), captions=str(coco / "captions.json"),
                          out=str(coco / "o"), max_image_size=40, progress=False)
    assert e["num"] == 2 and "qa.json" not in e["keys"]
    _, (b,) = _read(coco / "o", ["image", "text"])
    assert b["image"].shape == (2, 3, 30, 40)
    with pytest.raises(DataError, match="both --questions and --answers"):
        CONVERTERS.create("coco", images=str(coco / "val2014"), captions=str(coco / "captions.json"),
                          out=str(coco / "o2"), questions=str(coco / "questions.json"))
    (coco / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json is not valid JSON"):
        CONVERTERS.create("coco", images=str(coco / "val2014"), captions=str(coco / "broken.json"),
                          out=str(coco / "o3"))
    (coco / "nokey.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="nokey.json: the top level has no key 'annotations'"):
        CONVERTERS.create("coco", images=str(coco / "val2014"), captions=str(coco / "nokey.json"),
                          out=str(coco / "o4"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_folder(tmp_path, fmt):
    img = tmp_path / "imgs"
    img.mkdir()
    for i in range(3):
        _jpeg(img / f"p{i}.jpg", i, (32, 32))
    if fmt == "csv":
        (tmp_path / "caps.csv").write_text(
            'image,caption\np0.jpg,"a cat, sitting"\np1.jpg,a dog\np0.jpg,another\np2.jpg,x\nmissing.jpg,y\n')
    else:
        rows = [{"image": "p0.jpg", "captions": ["a cat, sitting", "another"]},
                {"image": "p1.jpg", "caption": "a dog"}, {"file_name": "p2.jpg", "text": "x"},
                {"image": "missing.jpg", "caption": "y"}]
        (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    e = CONVERTERS.create("folder", images=str(img), captions=str(tmp_path / f"caps.{fmt}"),
                          out=str(tmp_path / "out"), progress=False)
    assert e["num"] == 3 and e["skipped"] == 1
    _, (b,) = _read(tmp_path / "out", ["image", "text", "meta"])
    by_file = {m["file_name"]: c for m, c in zip(b["meta"], b["captions"])}
    assert by_file == {"p0.jpg": ["a cat, sitting", "another"], "p1.jpg": ["a dog"], "p2.jpg": ["x"]}


def test_folder_bad_table(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "t.csv").write_text("file,description\na.jpg,b\n")
    with pytest.raises(DataError, match="caption column"):
        CONVERTERS.create("folder", images=str(tmp_path / "imgs"), captions=str(tmp_path / "t.csv"),
                          out=str(tmp_path / "o"))
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(DataError, match=r"\.csv, \.tsv or \.jsonl"):
        CONVERTERS.create("folder", images=str(tmp_path / "imgs"), captions=str(tmp_path / "t.txt"),
                          out=str(tmp_path / "o"))
