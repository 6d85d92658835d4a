"""`omnimask demo --quick` runs every stage and writes the report files."""

import json

from omnimask.cli import main


def test_quick_demo(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(run), "num_train=300", "num_val=100",
                 "num_test=100", "num_test_novel=100", "shard_size=10", "vq_minutes=0.2",
                 "speech_units=32", "-q"]) == 0
    out = capsys.readouterr().out
    assert "== summary" in out and "resume exact: True" in out
    rep = json.loads((run / "report.json").read_text())
    assert set(rep["stages"]) == {"data", "inspect", "stats", "pipeline", "preview", "tokenizers",
                                  "pretrain"}
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
    assert set(rep["models"]) == {"tokenizer_text", "tokenizer_speech", "tokenizer_image",
                                  "pretrained"}
    p = m["pretrain"]
    assert p["steps"] == 10 and set(p["val"]) >= {"mlm", "itm", "itc", "cm3", "speech"}
    assert (run / "pretrain" / "generated_images.png").is_file()
    assert "## Pretraining" in (run / "report.md").read_text()
