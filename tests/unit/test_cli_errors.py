"""The command boundary: every bad input is one line ``omnimask: error: ...`` naming the key,
flag or path, exit 2; unexpected errors one line and exit 1 (tracebacks behind --debug);
configs are checked when loaded, before anything is built or written; SIGTERM/SIGUSR2
stop a run with a checkpoint and exit 3, and the same command resumes it."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from omnimask.cli import EXIT_INTERRUPTED, main
from omnimask.errors import ConfigError
from omnimask.registry import TOKENIZERS

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "shapes_tiny.yaml")
VQ_TINY = ["vq.quantizer=vq", "vq.downsample=3", "crop=0", "vq.channels=[8,8,8]",
           "vq.codebook_size=16", "vq.code_dim=4", "batch_size=4",
           "warmup_steps=0", "max_images=16"]


def _one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("omnimask: error:") and "\n" not in err, err
    for n in names:
        assert n in err, (n, err)
    return err


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch):
    """The same answers on a machine with a GPU: there is none."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def _signal_handlers():
    """Put SIGTERM/SIGUSR2 handling back after each test: a handler left behind (the
    trainer's, when its first evaluation raises) would be inherited by the worker processes
    later tests fork, and Pool.terminate's SIGTERM would no longer end them."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


# -- configs are validated at load: nothing is built or written -------------------------------
@pytest.mark.parametrize("override,key", [
    ("model.trunk.heads=0", "model.trunk.heads"),
    ("model.trunk.dim=-32", "model.trunk.dim"),
    ("model.trunk.heads=3", "model.trunk.heads"),  # 128 is not divisible by 3
    ("model.trunk.vocab_size=-5", "model.trunk.vocab_size"),
    ("model.trunk.dropout=1.0", "model.trunk.dropout"),
    ("model.speech_conv_groups=7", "model.speech_conv_groups"),
    ("trainer.lr=-1", "trainer.lr"),
    ("trainer.lr=nan", "trainer.lr"),
    ("trainer.checkpoint_every=0", "trainer.checkpoint_every"),
    ("trainer.log_every=0", "trainer.log_every"),
    ("trainer.ema=1.5", "trainer.ema"),
    ("trainer.betas=[0.9]", "trainer.betas"),
    ("trainer.device=cuda", "trainer.device"),
    ("trainer.device=cuda:1", "trainer.device"),
    ("trainer.device=gpu", "trainer.device"),
    ("data.val_batch_size=0", "data.val_batch_size"),
    ("objectives.mlm_prob=1.5", "objectives.mlm_prob"),
    ("objectives.mix.cm3=-1", "objectives.mix.cm3"),
    ("generate.top_k=-1", "generate.top_k"),
])
def test_pretrain_config_ranges_checked_at_load(override, key, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", TINY, "--out", str(run), override, "-q"]) == 2
    _one_line_error(capsys, key)
    assert not run.exists()


def test_cuda_index_beyond_the_gpus_is_named(monkeypatch, capsys, tmp_path):
    from omnimask.train.trainer import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["pretrain", "--config", TINY, "--out", str(tmp_path / "r"),
                 "trainer.device=cuda:1"]) == 2
    _one_line_error(capsys, "trainer.device", "'cuda:1'", "1 CUDA GPU")
    # a config built in Python (or loaded on a GPU machine) is checked again when resolved
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer\.device is 'cuda'"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("kind,overrides,key", [
    ("image", ["max_steps=-1", "max_minutes=0"], "max_steps"),
    ("image", ["max_steps=0", "max_minutes=0"], "max_steps or max_minutes must be > 0"),
    ("image", ["vq.codebook_size=0"], "vq.codebook_size"),
    ("image", ["vq.image_size=62"], "vq.image_size"),
    ("image", ["batch_size=0"], "batch_size"),
    ("text", ["vocab_size=-5"], "vocab_size"),
    ("speech", ["stack=0"], "stack"),
])
def test_tokenizer_config_ranges_checked_at_load(kind, overrides, key, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", kind, "--data", str(tmp_path / "none-*.tar"), "--out",
                 str(out), *overrides, "-q"]) == 2
    _one_line_error(capsys, key)
    assert not out.exists()  # refused before training: no untrained tokenizer "succeeds"


def test_demo_config_ranges_checked_at_load(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "vq_minutes=0", "-q"]) == 2
    _one_line_error(capsys, "vq_minutes")
    assert main(["demo", "--out", str(tmp_path / "d"), "num_train=0", "-q"]) == 2
    _one_line_error(capsys, "num_train")
    assert not (tmp_path / "d").exists()


# -- malformed overrides are refused, not dropped ---------------------------------------------
@pytest.mark.parametrize("token", ["trainer.max-steps=5", "trainer.max_steps", "=5", "a..b=1"])
@pytest.mark.parametrize("cmd", [["pretrain", "--config", TINY], ["demo"],
                                 ["tokenizer", "train", "image", "--data", "x.tar"]])
def test_malformed_override_is_named(cmd, token, tmp_path, capsys):
    assert main([*cmd, "--out", str(tmp_path / "o"), token, "-q"]) == 2
    _one_line_error(capsys, f"override {token!r}", "key=value")
    assert not (tmp_path / "o").exists()


def test_tokens_with_equals_elsewhere_are_not_overrides(tmp_path, capsys, monkeypatch):
    # an option's value and the shards of a command without overrides keep their "="
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", "a=b.yaml"]) == 2
    _one_line_error(capsys, "config file not found: a=b.yaml")
    assert main(["data", "inspect", "k=v.tar"]) == 2
    _one_line_error(capsys, "shard not found: k=v.tar")


# -- output directories and OS errors ---------------------------------------------------------
@pytest.mark.parametrize("cmd", [["pretrain", "--config", TINY], ["demo"],
                                 ["tokenizer", "train", "text", "--data", "x.tar"]])
def test_out_a_file_or_under_one(cmd, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    for out in (f, f / "sub"):
        assert main([*cmd, "--out", str(out), "-q"]) == 2
        _one_line_error(capsys, "--out", f"{f} is a file")
    assert f.read_text() == "keep me"


def test_out_not_writable(tmp_path, capsys, monkeypatch):
    # root may write anywhere, so the permission answer is what is simulated
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert main(["tokenizer", "train", "text", "--data", "x.tar", "--out",
                 str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--out", "is not writable")


def _text_train_raises(monkeypatch, exc):
    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(TOKENIZERS.get("text"), "train", staticmethod(boom))
    return ["tokenizer", "train", "text", "--data", "x.tar", "--out", "o", "-q"]


def test_full_disk_is_one_line_naming_the_file(monkeypatch, capsys):
    argv = _text_train_raises(monkeypatch, OSError(errno.ENOSPC, "No space left on device",
                                                   "o/tokenizer.json"))
    assert main(argv) == 2
    _one_line_error(capsys, "o/tokenizer.json: No space left on device")


def test_value_error_is_bad_input(monkeypatch, capsys):
    assert main(_text_train_raises(monkeypatch, ValueError("vocab too small\nmore"))) == 2
    assert _one_line_error(capsys) == "omnimask: error: vocab too small"


def test_unexpected_error_one_line_traceback_behind_debug(monkeypatch, capsys):
    argv = _text_train_raises(monkeypatch, RuntimeError("boom\nsecond line"))
    assert main(argv) == 1
    _one_line_error(capsys, "unexpected RuntimeError: boom", "run with --debug")
    with pytest.raises(RuntimeError, match="boom"):
        main([*argv, "--debug"])
    monkeypatch.setenv("OMNIMASK_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)


def test_bench_sizes_checked(capsys):
    for argv, key in ((["--heads", "0"], "--heads must be >= 1"),
                      (["--heads", "3"], "not divisible by --heads"),
                      (["--min-len", "300"], "--min-len 300"),
                      (["--device", "cuda"], "--device is 'cuda'")):
        assert main(["bench", "trunk", *argv]) == 2
        _one_line_error(capsys, key)
    assert main(["bench", "data", "--repeats", "0"]) == 2
    _one_line_error(capsys, "--repeats")


def test_help_documents_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"{EXIT_INTERRUPTED} interrupted by SIGTERM or SIGUSR2" in out and "--debug" in out


# -- runs: a tiny pretraining and VQ on a few samples -----------------------------------------
@pytest.fixture(scope="module")
def tiny_run(small_shards, tmp_path_factory):
    """A pretraining config over 60 samples: MLM only, a 1-step VQ, a one-layer trunk."""
    d = tmp_path_factory.mktemp("tiny_run")
    train = str(small_shards / "train-*.tar")
    TOKENIZERS.get("text").train([train], str(d / "text"), progress=False)
    TOKENIZERS.get("image").train([train], str(d / "image"), [*VQ_TINY, "max_steps=1"],
                                  progress=False)
    mix = dict.fromkeys(["itm", "mrfr", "mrc", "mim", "itc", "cm3", "speech"], 0) | {"mlm": 1}
    cfg = {"data": {"train": [train], "val": [train], "val_batches": 1, "val_batch_size": 4},
           "tokenizers": {"text": str(d / "text"), "image": str(d / "image")},
           "model": {"trunk": {"dim": 16, "layers": 1, "heads": 2, "ffn_dim": 32}},
           "objectives": {"mix": mix},
           "trainer": {"max_steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_every": 0,
                       "tensorboard": False}}
    path = d / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_max_positions_smaller_than_a_sample(tiny_run, tmp_path, capsys):
    assert main(["pretrain", "--config", str(tiny_run), "--out", str(tmp_path / "r"),
                 "model.trunk.max_positions=16", "-q"]) == 2
    err = _one_line_error(capsys, "model.trunk.max_positions=16 is smaller than a sample of")
    assert int(err.split("a sample of ")[1].split()[0]) > 16


def test_interrupted_pretraining_exits_3_then_resumes(tiny_run, tmp_path, capsys, monkeypatch):
    from omnimask.train.pretrain import Pretraining

    make_batch = Pretraining.make_batch

    def preempted(self, step, micro):
        if step == 1:
            os.kill(os.getpid(), signal.SIGUSR2)  # a scheduler's notice, mid-run
        return make_batch(self, step, micro)

    argv = ["pretrain", "--config", str(tiny_run), "--out", str(tmp_path / "r"), "-q"]
    monkeypatch.setattr(Pretraining, "make_batch", preempted)
    assert main(argv) == EXIT_INTERRUPTED == 3
    captured = capsys.readouterr()
    assert "interrupted by SIGUSR2 at step 2" in captured.out
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("omnimask: pretraining interrupted by SIGUSR2 at step 2")
    assert "checkpoint saved in" in err and "run the same command again to resume" in err
    monkeypatch.setattr(Pretraining, "make_batch", make_batch)
    assert main(argv) == 0  # the same command resumes and finishes
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["step"] == 3


def test_interrupted_image_tokenizer_exits_3_then_resumes(small_shards, tmp_path, capsys,
                                                          monkeypatch):
    from omnimask.modalities.image import tokenizer as it
    from omnimask.train import trainer

    lr = trainer.lr_at  # the one schedule, asked once a step

    def preempted(cfg, step, *args, **kw):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr(cfg, step, *args, **kw)

    out = tmp_path / "vq"
    argv = ["tokenizer", "train", "image", "--data", str(small_shards / "train-*.tar"),
            "--out", str(out), *VQ_TINY, "max_steps=3", "-q"]
    monkeypatch.setattr(trainer, "lr_at", preempted)
    assert main(argv) == EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip()
    assert err.startswith("omnimask: image tokenizer training interrupted by SIGTERM at step 2")
    assert "run the same command again to resume" in err and "\n" not in err
    assert not (out / it.WEIGHTS).exists()  # not finished: no tokenizer to mistake for one
    monkeypatch.setattr(trainer, "lr_at", lr)
    assert main(argv) == 0
    assert "steps: 3" in capsys.readouterr().out and (out / it.WEIGHTS).is_file()
