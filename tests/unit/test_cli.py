"""The command line: help texts, the data commands end to end, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from omnimask.cli import build_parser, main

COMMANDS = [[], ["data"], ["data", "shapes"], ["data", "inspect"], ["data", "convert"],
            ["data", "convert", "coco"], ["data", "convert", "folder"], ["bench"],
            ["bench", "data"], ["bench", "tokenizer"], ["bench", "trunk"], ["demo"], ["tokenizer"], ["tokenizer", "train"],
            ["tokenizer", "eval"], ["pretrain"], ["export"], ["list"], ["zoo"], ["zoo", "list"],
            ["zoo", "info"], ["zoo", "download"], ["zoo", "publish"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "omnimask")
def test_help_works_everywhere(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: omnimask" in capsys.readouterr().out


def test_only_implemented_commands_exist():
    sub = build_parser()._subparsers._group_actions[0].choices
    assert set(sub) == {"data", "bench", "demo", "tokenizer", "pretrain", "finetune", "eval",
                        "export", "list", "zoo", "submit"}


def test_shapes_then_inspect(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "shapes", "--out", str(out), "--num", "12", "--seed", "2",
                 "--split", "train,val", "--shard-size", "5", "--no-speech", "-q"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar",
        "val-000000.tar", "val-000001.tar", "val-000002.tar"]
    capsys.readouterr()
    assert main(["data", "inspect", str(out / "*.tar"), "--strict", "--json",
                 str(tmp_path / "r.json"), "-q"]) == 0
    text = capsys.readouterr().out
    assert "samples: 24" in text and "bad samples: 0" in text and "per split: train 12, val 12" in text
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["keys"]["image.png"] == 24 and "speech.flac" not in rep["keys"]
    # a damaged shard makes --strict fail
    p = out / "val-000001.tar"
    p.write_bytes(p.read_bytes()[:3000])
    assert main(["data", "inspect", str(out / "val-*.tar"), "--strict", "-q"]) == 1


@pytest.mark.parametrize("argv,msg", [
    (["data", "inspect", "/nonexistent/x.tar"], "shard not found: /nonexistent/x.tar"),
    (["data", "shapes", "--out", "X", "--split", "dev"], "--split: unknown split 'dev'"),
    (["data", "shapes", "--out", "X", "--num", "0"], "--num must be >= 1"),
    (["data", "convert", "folder", "--images", "/nonexistent", "--captions", "c.csv", "--out", "o"],
     "image folder not found"),
    (["demo", "num_trian=5"], "num_trian"),
    (["zoo", "info", "nobody/nothing"], "no zoo model named 'nobody/nothing'"),
    (["zoo", "publish", "/nonexistent", "--name", "a/b", "--to", "X"],
     "/nonexistent is not a directory"),
    (["zoo", "publish", "/tmp", "--name", "Bad", "--to", "X"], "--name 'Bad' is not 'org/model'"),
])
def test_bad_input_is_one_line_and_nonzero(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("omnimask: error:") and msg in err and "\n" not in err


def test_bench_data_writes_contract_json(tmp_path, capsys):
    d = tmp_path / "d"
    main(["data", "shapes", "--out", str(d), "--num", "40", "--shard-size", "20", "-q"])
    out = tmp_path / "bench.json"
    assert main(["bench", "data", "--data", str(d / "*.tar"), "--repeats", "1", "--workers", "2",
                 "--batch-size", "8", "--out", str(out), "-q"]) == 0
    r = json.loads(out.read_text())
    assert r["bench"] == "data" and r["device"] == "cpu" and r["machine"]["cores"] >= 1
    # the ISA torch dispatches to tells CPUs of one model name apart
    assert r["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(r["machine"]["native_bf16"], bool)
    for section in ("omnimask", "speech", "webdataset"):
        assert r[section]["one_core"]["samples"] == 40, section
        assert r[section]["workers_2"]["samples"] == 40, section
        assert r[section]["one_core"]["samples_per_s"] > 0
    assert r["ratio"] > 0


def test_bench_tokenizer_json(shapes_dir, tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "tokenizer", "--data", str(shapes_dir / "test-novel-*.tar"),
                 "--repeats", "1", "--out", str(out), "-q"]) == 0
    r = json.loads(out.read_text())
    assert r["bench"] == "tokenizer" and r["config"]["images"] == 30
    enc = r["image_vq_encode"]  # the default tokenizer: 16 x 16 codes
    assert enc["images_per_s"] > 0 and enc["tokens_per_image"] == 256
    assert r["speech_bestrq_encode"]["audio_seconds_per_s"] > 0
    assert r["speech_kmeans_encode"]["units_per_second"] == 25.0


def test_bench_trunk_json(tmp_path):
    out = tmp_path / "t.json"
    assert main(["bench", "trunk", "--layers", "2", "--dim", "32", "--heads", "2", "--ffn", "64",
                 "--vocab", "100", "--batch", "3", "--min-len", "4", "--max-len", "16",
                 "--steps", "2", "--warmup", "1", "--device", "cpu", "--rounds", "1",
                 "--out", str(out), "-q"]) == 0
    r = json.loads(out.read_text())
    assert r["bench"] == "trunk" and r["device"] == "cpu" and r["config"]["isolated_processes"]
    for key in ("variable", "full_length"):
        ours, hf = r[key]["omnimask"], r[key]["hf"]
        assert ours["tokens_per_s"] > 0 and hf["tokens_per_s"] > 0 and r[key]["ratio"] > 0
        # packing and projecting only masked positions: less work per real token
        assert 0 < ours["mflop_per_token"] < hf["mflop_per_token"]
        for side in (ours, hf):
            assert side["matmul_peak_gflop_per_s"] > 0 and side["peak_mem_mb"] > 0
            assert side["peak_fraction"] == pytest.approx(
                side["gflop_per_s"] / side["matmul_peak_gflop_per_s"], abs=2e-3)
        assert hf["attention"] == "sdpa (padded)"
    # the paths ours ran on CPU: one call per sample, or a view when every length is equal
    # (the last layer's masked rows: per sample)
    assert r["variable"]["omnimask"]["attention"] == "sdpa per sample"
    assert set(r["full_length"]["omnimask"]["attention"].split(", ")) == {
        "sdpa view", "sdpa per sample"}


def test_bench_trunk_bf16_on_cpu():
    """--dtype bf16: both sides step under bf16 autocast, against the bf16 matmul peak."""
    from omnimask.bench_trunk import bench_trunk, matmul_peak, step_dtype

    cpu = torch.device("cpu")
    assert step_dtype(cpu) == torch.float32 and step_dtype(cpu, "bf16") == torch.bfloat16
    assert step_dtype(torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        step_dtype(cpu, "fp16")
    assert matmul_peak(cpu, torch.bfloat16) > 0
    r = bench_trunk(1, 32, 2, 64, 100, 3, 4, 16, steps=2, warmup=1, device="cpu", rounds=1,
                    isolate=False, dtype="bf16")
    assert r["config"]["dtype"] == "bf16 autocast"
    # the same work is counted whatever the dtype
    f32 = bench_trunk(1, 32, 2, 64, 100, 3, 4, 16, steps=2, warmup=1, device="cpu", rounds=1,
                      isolate=False)
    assert f32["config"]["dtype"] == "float32"
    for key in ("variable", "full_length"):
        for side in ("omnimask", "hf"):
            assert r[key][side]["mflop_per_token"] == f32[key][side]["mflop_per_token"]


def test_bench_counts_cpu_flash_attention_flops():
    """The FLOP counter learns the CPU flash-attention kernels: forward = two bmms."""
    from torch.utils.flop_counter import FlopCounterMode

    from omnimask.bench_trunk import _flop_mapping

    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as fc:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert fc.get_total_flops() == 2 * (2 * 2 * 3 * 10 * 10 * 8)


def test_quiet_silences_warnings_for_the_command_only(caplog):
    import logging
    import warnings

    from omnimask.cli import _quiet

    log = logging.getLogger("omnimask.test")
    with _quiet(True):
        log.warning("hidden")
        log.error("shown")
        with warnings.catch_warnings(record=True) as silenced:  # inherits -q's filter
            warnings.warn("library noise", UserWarning, stacklevel=1)
    assert "hidden" not in caplog.text and "shown" in caplog.text
    assert silenced == []
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        warnings.warn("library noise", UserWarning, stacklevel=1)
        log.warning("after")
    assert len(heard) == 1 and "after" in caplog.text  # both restored after the command


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["data", "shapes", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--seed SEED default: 0" in text and "samples per shard (default: 1000)" in text
    assert "(default: 1000) (default" not in text
