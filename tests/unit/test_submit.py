"""``omnimask submit``'s pieces that need no cluster (the cluster ones are in
tests/integration/test_slurm.py), and the distributed helpers' contracts."""

from __future__ import annotations

import pytest
import torch

from omnimask.cli import main
from omnimask.cli.submit import run_dir_of
from omnimask.errors import ConfigError, OmnimaskError
from omnimask.train import distributed as dist
from omnimask.train.slurm import CommandJob, _yaml_value, load_sweep
from omnimask.train.trainer import TrainerConfig


def test_a_sweep_is_a_list_of_override_sets(tmp_path):
    p = tmp_path / "sweep.yaml"
    p.write_text("- {trainer.lr: 0.001, trainer.seed: 2}\n- [model.trunk.layers=4]\n"
                 "- {objectives.mix: {mlm: 1, itc: 2}}\n")
    assert load_sweep(p) == [["trainer.lr=0.001", "trainer.seed=2"], ["model.trunk.layers=4"],
                             ["objectives.mix={itc: 2, mlm: 1}"]]
    for text, what in (("{}", "non-empty YAML list"), ("- 3\n", "item 0"),
                       ("- [lr]\n", "item 0"), ("- [\n", str(p))):
        p.write_text(text)
        with pytest.raises(ConfigError, match=what):
            load_sweep(p)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_sweep(tmp_path / "missing.yaml")
    assert _yaml_value(True) == "true" and _yaml_value([1, 2]) == "[1, 2]"


def test_the_run_directory_comes_from_the_command_line(tmp_path):
    out = run_dir_of(["pretrain", "--config", "shapes_tiny", f"out={tmp_path}/a", "-q"])
    assert out == tmp_path / "a"
    assert run_dir_of(["pretrain", "--config", "shapes_tiny", "--out", str(tmp_path / "b"),
                       "trainer.max_steps=3"]) == tmp_path / "b"
    with pytest.raises(OmnimaskError, match="runs pretrain or finetune, got 'eval'"):
        run_dir_of(["eval", "vqa"])
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        run_dir_of(["pretrain", "--config", "shapes_tiny", "trainer.max_steps=-1"])


def test_submit_without_a_command_is_a_one_line_error(capsys):
    assert main(["submit", "--time", "5"]) == 2
    assert "needs the command to run" in capsys.readouterr().err
    assert main(["submit", "--nodes", "0", "pretrain", "--config", "shapes_tiny"]) == 2
    assert "--nodes must be >= 1" in capsys.readouterr().err


def test_a_job_runs_its_command_line_and_reports_a_failure(monkeypatch):
    monkeypatch.setattr(dist, "export_submitit_env", lambda: {"RANK": "0"})
    seen = []
    assert CommandJob(lambda argv: seen.append(argv) or 0, ["pretrain", "-q"])() == 0
    assert seen == [["pretrain", "-q"]]
    with pytest.raises(OmnimaskError, match="exited with status 2"):
        CommandJob(lambda argv: 2, ["pretrain"])()
    # requeued as it is
    job = CommandJob(len, ["x"])
    again = job.checkpoint()
    assert again.function.argv == ["x"] and again.function.main is len


def test_parallel_settings_are_checked():
    with pytest.raises(ValueError, match=r"trainer.parallel must be none\|ddp\|fsdp"):
        TrainerConfig(parallel="zero3")
    with pytest.raises(ValueError, match="trainer.ema is not supported with trainer.parallel=fsdp"):
        TrainerConfig(parallel="fsdp", ema=0.99)


def test_fsdp_shards_the_outermost_list_elements():
    from omnimask.fusion.trunk import Trunk, TrunkConfig

    t = Trunk(TrunkConfig(vocab_size=20, dim=16, heads=2, layers=3, ffn_dim=16,
                          multiway=True))
    units = dist.shard_units(t)
    assert units == list(t.blocks)  # not the per-modality FFNs inside them


def test_the_forward_entry_calls_the_wrapper_and_reads_the_module():
    m = torch.nn.Linear(2, 2)
    calls = []

    def wrapper(*a):
        calls.append(a)
        return m(*a)

    f = dist.Forward(m, wrapper)
    x = torch.ones(1, 2)
    torch.testing.assert_close(f(x), m(x))
    assert len(calls) == 1 and f.weight is m.weight
    assert dist.wrap(m, "ddp", torch.device("cpu")) is m  # one process: nothing to wrap
    assert dist.unwrap(m) is m and not dist.is_fsdp(m)
    assert dist.all_max([1.0, 0.0]) == [1.0, 0.0] and dist.broadcast_str("x") == "x"
