"""`omnimask demo --quick` runs every stage and writes the report files."""

import json
from pathlib import Path

import omnimask
from omnimask.cli import main


def test_quick_demo(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(run), "num_train=300", "num_val=100",
                 "num_test=100", "num_test_novel=100", "shard_size=10", "vq_steps=20",
                 "speech_units=32", "precision=bf16", "-q"]) == 0
    out = capsys.readouterr().out
    assert "== summary" in out and "resume exact: True" in out
    rep = json.loads((run / "report.json").read_text())
    assert set(rep["stages"]) == {"data", "inspect", "stats", "pipeline", "preview", "tokenizers",
                                  "pretrain", "tasks", "zoo"}
    assert all(s["status"] == "ok" for s in rep["stages"].values())
    m = rep["metrics"]
    assert m["data"]["train"]["samples"] == 30 and m["inspect"]["bad"] == 0
    assert m["inspect"]["samples"] == 60 and m["inspect"]["lost"] == 0
    assert m["stats"]["test-novel"]["images_with_novel_pair"] == 10
    assert m["stats"]["train"]["images_with_novel_pair"] == 0
    assert m["pipeline"]["resume_exact"] is True and m["pipeline"]["bad"] == 0
    assert m["pipeline"]["samples"] == 30
    assert 0 < m["stats"]["train"]["prior_baseline"] < 1
    for f in ("config.yaml", "report.md", "report.html", "samples_train.png",
              "samples_test-novel.png"):
        assert (run / f).is_file(), f
    assert "num_train: 300" in (run / "config.yaml").read_text()
    t = m["tokenizers"]
    assert t["text"]["roundtrip_exact"] == 1.0 and t["speech"]["size"] == 32
    assert t["image"]["images"] == 10 and (run / "vq_reconstructions.png").is_file()
    assert t["image"]["steps"] == t["image"]["max_steps"] == 2  # a tenth of vq_steps
    assert len(t["image"]["usage_per_level"]) == 4  # residual levels: id stacks
    assert set(rep["models"]) == {"tokenizer_text", "tokenizer_speech", "tokenizer_image",
                                  "pretrained", "pretrained_model", "vqa", "retrieval", "caption",
                                  "segment", "zoo"}
    p = m["pretrain"]
    assert p["steps"] == 10 and set(p["val"]) >= {"mlm", "itm", "itc", "cm3", "speech",
                                                  "maskgit"}  # MaskGIT draws the stacks
    assert (run / "pretrain" / "generated_images.png").is_file()
    # the encoder's warm-up ran first (a few steps when quick), then the encoder was frozen
    assert p["encoder_warmup"]["steps"] == 5 and p["encoder_warmup"]["classes"] == 7
    assert "frozen: true" in (run / "pretrain" / "config.yaml").read_text()
    # the demo's precision reaches the VQ's and the warm-up's convolutions, not the trunk
    assert t["image"]["precision"] == p["encoder_warmup"]["precision"] == "bf16"
    assert "precision: bf16" not in (run / "finetune" / "config.yaml").read_text()
    assert "## Pretraining" in (run / "report.md").read_text()
    x = m["tasks"]
    assert list(x["runs"]) == ["multitask", "vqa", "final", "segment"]
    assert [(r["steps"], r["max_steps"]) for r in x["runs"].values()] == [(10, 10)] * 4
    for task, split_metric in (("vqa", "accuracy"), ("retrieval", "t2i_r10"),
                               ("caption", "pair_precision"), ("segment", "miou"),
                               ("refer", "miou")):
        for split in ("test", "test-novel"):
            assert 0 <= x["eval"][task][split]["metrics"][split_metric] <= 1
            assert x["eval"][task][split]["n"] == 10  # the split's own shards only
    # the chain: retrieval and captions on one encoder, VQA alone from that model,
    # retrieval and captions again from the VQA model (the ones served), segmentation from
    # the pretrained model
    r = x["runs"]
    assert r["multitask"]["init"] == rep["models"]["pretrained_model"]
    assert r["vqa"]["init"] == r["multitask"]["model"] != rep["models"]["caption"]
    assert r["final"]["init"] == rep["models"]["vqa"] == r["vqa"]["model"]
    assert rep["models"]["retrieval"] == rep["models"]["caption"] == r["final"]["model"]
    assert r["segment"]["init"] == rep["models"]["pretrained_model"]
    # run_settings: VQA trains the pixel encoder, the final run keeps it frozen
    assert not omnimask.load(rep["models"]["vqa"]).cfg.image_encoder.frozen
    for task in ("vqa", "retrieval", "caption", "segment"):
        assert (Path(rep["models"][task]) / "config.json").is_file()
    mt = omnimask.load(rep["models"]["caption"])
    assert mt.cfg.image_encoder.frozen
    assert set(mt.heads) == {"retrieval", "caption"}
    rc = mt.head_configs["retrieval"]  # retrieval_itm off: ITC alone trains and ranks
    assert (rc.itm_weight, rc.rerank_k) == (0.0, 0)
    assert mt.head_configs["caption"].no_repeat_ngram == 3  # shapes_tasks' decoding
    assert set(omnimask.load(rep["models"]["segment"]).heads) == {"segment"}
    assert x["eval"]["segment"]["test"]["metrics"]["objects"] == 4  # quick's protocol
    assert {"examples/vqa_examples.png", "examples/caption_examples.png",
            "examples/retrieval_examples.png", "examples/segment_examples.png",
            "examples/refer_examples.png"} <= set(x["examples"])
    md = (run / "report.md").read_text()
    assert "## Tasks" in md and "| VQA accuracy | test |" in md and "](examples/vqa_examples.png)" in md
    assert "| semantic mIoU | test |" in md and "| referring mIoU | test-novel |" in md
    # the shipped zoo models: fetched into the run's own cache, evaluated beside the demo's
    z = m["zoo"]
    assert Path(z["cache"]) == run / "zoo" and set(rep["models"]["zoo"]) == set(z["models"])
    from omnimask.zoo import builtin_manifest
    from omnimask.zoo.manifest import read_manifest_file

    shipped = {t for e in read_manifest_file(builtin_manifest()) for t in e.tasks}
    assert set(z["eval"]) == shipped & {"vqa", "retrieval", "caption", "segment", "refer"}
    assert {"vqa", "retrieval", "caption"} <= set(z["eval"])
    for task, e in z["eval"].items():
        assert e["result"]["n"] == 10 and e["model"] in z["models"], task
    assert "## Zoo models beside the demo's" in md and "| VQA accuracy | " in md
    page = (run / "report.html").read_text()  # rendered, self-contained
    assert "<h2>Tasks" in page and "| stage |" not in page and 'src="examples/' not in page
    assert (run / "training_curves.png").is_file() and "## Training curves" in md
