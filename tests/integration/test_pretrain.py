"""`omnimask pretrain` end to end on tiny ShapesWorld: exact resume after SIGKILL, outputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from omnimask.registry import TOKENIZERS
from omnimask.train import checkpoint as ckpt
from omnimask.train.data.shapesworld import judge


@pytest.fixture(scope="module")
def tiny_config(shapes_dir, tiny_tokenizers, tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrain")
    train, val = str(shapes_dir / "train-*.tar"), str(shapes_dir / "test-novel-*.tar")
    for kind in ("text", "image", "speech"):  # copies: a test retrains one in place
        shutil.copytree(tiny_tokenizers / kind, d / kind)
    # a judge trained on a few scenes: the run loads it and scores its drawn images
    judge.load_or_train(d / "judge.safetensors", progress=False, scenes=40, epochs=1)
    cfg = {"data": {"train": [train], "val": [val], "val_batches": 1, "val_batch_size": 8},
           "tokenizers": {"text": str(d / "text"), "image": str(d / "image"),
                          "speech": str(d / "speech")},
           "model": {"trunk": {"dim": 32, "layers": 2, "heads": 2, "ffn_dim": 64,
                               "max_positions": 512}, "itc_batchnorm": True},
           "objectives": {"speech_max_units": 40, "mix_ramp_steps": 15,
                          "mix_start": {"itc": 2, "itm": 2, "cm3": 1, "mlm": 1}},
           "trainer": {"max_steps": 20, "batch_size": 6, "lr": 1e-3, "warmup_steps": 3,
                       "checkpoint_every": 10, "eval_every": 10, "log_every": 5,
                       "tensorboard": True},
           "generate": {"captions": 2, "images": 3, "grid_images": 2, "caption_candidates": 2,
                        "shape_judge": str(d / "judge.safetensors")}}
    path = d / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config, out, env_extra=None, *overrides, quiet=True):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "omnimask.cli", "pretrain", "--config",
                           str(config), "--out", str(out), *(["-q"] if quiet else []),
                           *overrides], env=env, capture_output=True, text=True, timeout=600)


def _train_losses(run):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["objective"], r["loss"]) for r in rows if r["split"] == "train"]


def test_sigkill_then_resume_equals_straight_run(tiny_config, tmp_path):
    straight = _run(tiny_config, tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _run(tiny_config, tmp_path / "b", {"OMNIMASK_TEST_SIGKILL_AT": "12"})
    assert killed.returncode == -signal.SIGKILL  # died, no clean exit
    assert ckpt.latest(tmp_path / "b" / "checkpoints").name == "step_00000010"
    assert _train_losses(tmp_path / "b")[-1][0] == 12  # it had gone past the checkpoint
    resumed = _run(tiny_config, tmp_path / "b", quiet=False)  # -q would hide the warning
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
    assert len(a) == 20 and a == b  # identical per-step losses, nothing logged twice
    assert len({o for _, o, _ in a}) >= 5  # the mix drew several objectives

    run = tmp_path / "a"
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["val"]) == {"mlm", "itm", "mrfr", "mrc", "mim", "itc", "cm3", "speech"}
    assert (run / "generated_images.png").is_file() and list((run / "tb").iterdir())
    assert len(summary["samples"]["captions"]) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "tensors": 0})
    ev.Reload()  # the samples beside the curves: the drawn images and the captions
    assert [e.step for e in ev.Images("samples/generated_images")] == [20]
    assert "samples/captions/text_summary" in ev.Tags()["tensors"]
    s = summary["samples"]
    assert s["images_judged"] == 3 and 0 <= s["images_shape_hit"] <= 1
    assert s["reconstructions_named"] == s["images_named"] > 0  # the same captions
    assert "Shape judge on images drawn from 3 val captions" in straight.stdout
    assert (run / "config.yaml").is_file() and (run / "vocab.json").is_file()
    assert str(run) in straight.stdout.splitlines()[-1]

    # the run exports to a model directory that alone rebuilds the model and its tokenizers
    import omnimask
    from omnimask.train.export import export_run

    sd = load_file(str(ckpt.latest(run / "checkpoints") / "model.safetensors"))
    assert all(k.startswith(("encoder.", "heads.")) for k in sd)
    model = omnimask.load(export_run(run, tmp_path / "final"))
    assert set(model.tokenizers) == {"text", "image", "speech"}
    from omnimask.train.objectives.base import OBJECTIVES

    # every objective's head (one checkpoint layout), whichever the mix trained
    assert set(model.heads) == set(OBJECTIVES.names()) >= set(summary["val"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    best = export_run(run, tmp_path / "best", which="best")  # step 10 or 20: both validated
    assert omnimask.load(best, heads={"vqa": {"num_answers": 3}}).load_report["fresh"]


def test_bad_config_names_the_key(tiny_config, tmp_path):
    r = _run(tiny_config, tmp_path / "c", None, "objectives.mix.nope=1")
    assert r.returncode == 2 and "objectives.mix.nope" in r.stderr


def _snapshot(run):
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}


def test_resume_with_other_tokenizers_is_refused_and_a_planted_pickle_never_runs(
        tiny_config, shapes_dir, tmp_path, plant_pickle):
    from omnimask.config import load_config
    from omnimask.modalities.vocab import VocabMismatch
    from omnimask.train.pretrain import PretrainConfig, Pretraining

    run, marker = tmp_path / "run", tmp_path / "pwned"
    run.mkdir()
    plant_pickle(run / "corpus-val.safetensors", marker)
    short = ["trainer.max_steps=2", "trainer.checkpoint_every=1", "trainer.eval_every=0",
             "generate.captions=1", "generate.images=1", "generate.grid_images=1",
             "generate.caption_candidates=1", "generate.shape_judge=null"]
    cfg = load_config(PretrainConfig, tiny_config, short, out=str(run))
    Pretraining(cfg, progress=False).fit()
    assert not marker.exists()  # the planted cache was refused, rebuilt, never unpickled
    before = _snapshot(run)

    # a text tokenizer retrained on other text: other merges
    other_text = tmp_path / "text2"
    TOKENIZERS.get("text").train([str(shapes_dir / "test-novel-*.tar")], str(other_text),
                                 progress=False)
    with pytest.raises(VocabMismatch, match="text"):
        Pretraining(load_config(PretrainConfig, tiny_config,
                                [*short, f"tokenizers.text={other_text}"], out=str(run)),
                    progress=False)
    # an image tokenizer of the same size whose weights differ: the fingerprint names it
    image = yaml.safe_load(tiny_config.read_text())["tokenizers"]["image"]
    other_image = tmp_path / "image2"
    shutil.copytree(image, other_image)
    w = next(p for p in other_image.iterdir() if p.suffix == ".safetensors")
    buf = bytearray(w.read_bytes())
    buf[-2] ^= 1
    w.write_bytes(bytes(buf))
    with pytest.raises(VocabMismatch, match=r"tokenizers.image .* not the tokenizer this run"):
        Pretraining(load_config(PretrainConfig, tiny_config,
                                [*short, f"tokenizers.image={other_image}"], out=str(run)),
                    progress=False)
    assert _snapshot(run) == before  # nothing in the run directory was rewritten
    # the original tokenizers still resume
    Pretraining(load_config(PretrainConfig, tiny_config, short, out=str(run)), progress=False)


def test_shards_without_speech_drop_the_speech_objective(small_shards, tiny_tokenizers,
                                                         tmp_path, caplog):
    from omnimask.config import load_config
    from omnimask.errors import ConfigError
    from omnimask.train.pretrain import PretrainConfig, Pretraining

    t = tiny_tokenizers
    values = {"out": str(tmp_path / "run"),
              "data": {"train": [str(small_shards / "train-*.tar")],
                       "val": [str(small_shards / "train-*.tar")], "val_batches": 1,
                       "val_batch_size": 8},
              "tokenizers": {"text": str(t / "text"), "image": str(t / "image")},
              "model": {"trunk": {"dim": 32, "layers": 1, "heads": 2, "ffn_dim": 32,
                                  "max_positions": 512}}}
    cfg = load_config(PretrainConfig, None, **values)
    assert cfg.objectives.mix["speech"] > 0  # the default mix has it
    with caplog.at_level("WARNING", logger="omnimask.pretrain"):
        pre = Pretraining(cfg, progress=False)
    pre.lock.release()
    assert "speech" not in pre.names and "mlm" in pre.names
    assert "the speech objective is left out" in caplog.text
    only = load_config(PretrainConfig, None, ["objectives.mix={speech: 1}"],
                       **{**values, "out": str(tmp_path / "only")})
    with pytest.raises(ConfigError, match="no objective but speech"):
        Pretraining(only, progress=False)
