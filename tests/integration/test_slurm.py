"""``omnimask submit`` on a real single-node SLURM cluster (tools/slurm/local_cluster.sh):
a 2-task DDP pretraining job preempted by ``scontrol requeue`` and, separately, by its time
limit (SIGUSR2 ahead of it) resumes and ends with exactly the planned steps and the weights
of an uninterrupted job; a job array runs each override set in its own run directory.

Needs root and Debian's slurmctld, slurmd, slurm-client and munge; skipped otherwise,
unless OMNIMASK_REQUIRE_SLURM=1 (CI), which makes a missing cluster a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "tools" / "slurm" / "local_cluster.sh"
STEPS = 40


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root"
    for b in ("munged", "slurmctld", "slurmd"):
        if not Path("/usr/sbin", b).exists():
            return f"/usr/sbin/{b} not installed (apt-get install slurmctld slurmd munge)"
    for b in ("sbatch", "squeue", "scontrol"):
        if shutil.which(b) is None:
            return f"{b} not installed (apt-get install slurm-client)"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = _missing()
    if why:
        if os.environ.get("OMNIMASK_REQUIRE_SLURM") == "1":
            pytest.fail(f"OMNIMASK_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "OMNIMASK_SLURM_DIR": str(state),
           "OMNIMASK_SLURMCTLD_PORT": "7817", "OMNIMASK_SLURMD_PORT": "7818"}
    p = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True,
                       timeout=120)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="module")
def tiny_config(shapes_dir, tiny_tokenizers, tmp_path_factory) -> Path:
    t = tiny_tokenizers
    cfg = {"data": {"train": [str(shapes_dir / "train-*.tar")],
                    "val": [str(shapes_dir / "test-novel-*.tar")],
                    "val_batches": 1, "val_batch_size": 8},
           "tokenizers": {"text": str(t / "text"), "image": str(t / "image"),
                          "speech": str(t / "speech")},
           "model": {"trunk": {"dim": 32, "layers": 2, "heads": 2, "ffn_dim": 64,
                               "max_positions": 512}, "image_input": "pixels",
                     "image_encoder": {"channels": [8, 16, 32], "stem_channels": 8}},
           "objectives": {"mix": {"mlm": 1, "itc": 1, "itm": 1, "mrfr": 0, "mrc": 0,
                                  "mim": 0, "cm3": 0, "speech": 0}},
           "trainer": {"max_steps": STEPS, "batch_size": 8, "warmup_steps": 2,
                       "eval_every": 0, "checkpoint_every": 1000, "device": "cpu",
                       "threads": 1, "tensorboard": False, "parallel": "ddp"}}
    p = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def submit(args: list[str], sleep: float = 0.0) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sleep:
        env["OMNIMASK_TEST_STEP_SLEEP"] = str(sleep)
    p = subprocess.run([sys.executable, "-m", "omnimask.cli", "submit", "--json", *args],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def state(job: str) -> tuple[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    fields = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)
    return fields.get("JobState", "UNKNOWN"), fields.get("Reason", "")


def wait(job: str, timeout: float = 600) -> str:
    """Until the job ends; a requeued job is released early (SLURM holds requeued jobs for
    two minutes before they are eligible again), but only once the node has finished the
    old allocation and a few seconds have passed: slurmd refuses a launch whose credential
    dates from the second its predecessor's was revoked ("Job credential revoked")."""
    end = time.monotonic() + timeout
    held_since = None
    while time.monotonic() < end:
        st, reason = state(job)
        if st in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return st
        if st == "PENDING" and reason == "BeginTime":
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since >= 3 and node_idle():
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                               capture_output=True)
        else:
            held_since = None
        time.sleep(1)
    raise AssertionError(f"job {job} still {state(job)} after {timeout} s")


def node_idle() -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and set(out.stdout.split()) == {"idle"}


def train_steps(run: Path) -> list[int]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r.get("split") == "train"]


def final_weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"))


def logs(job: dict) -> str:
    return "".join(p.read_text(errors="replace") for p in
                   Path(job["stderr"]).parent.glob(f"{job['job_id']}_*_log.err"))


@pytest.fixture(scope="module")
def reference(slurm, tiny_config, tmp_path_factory) -> Path:
    """The same 2-task job, never interrupted."""
    run = tmp_path_factory.mktemp("ref") / "run"
    (job,) = submit(["--tasks-per-node", "2", "--time", "10", "pretrain", "--config",
                     str(tiny_config), f"out={run}", "-q"])
    assert wait(job["job_id"]) == "COMPLETED", logs(job)
    assert train_steps(run) == list(range(1, STEPS + 1))
    return run


def assert_resumed_exactly(job: dict, run: Path, reference: Path, signal: str) -> None:
    """The job was stopped by ``signal``, requeued, found the project installed, and ended
    with every planned step logged once and the uninterrupted job's weights."""
    assert wait(job["job_id"]) == "COMPLETED", logs(job)
    text = logs(job)
    assert f"interrupted by {signal}" in text
    assert "ModuleNotFoundError" not in text
    assert train_steps(run) == list(range(1, STEPS + 1))
    a, b = final_weights(run), final_weights(reference)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_scontrol_requeue_resumes_with_no_step_repeated_or_skipped(reference, tiny_config,
                                                                    tmp_path):
    run = tmp_path / "run"
    (job,) = submit(["--tasks-per-node", "2", "--time", "10", "pretrain", "--config",
                     str(tiny_config), f"out={run}", "-q"], sleep=0.4)
    end = time.monotonic() + 300
    while not ((run / "metrics.jsonl").is_file() and len(train_steps(run)) >= 8):
        assert time.monotonic() < end and state(job["job_id"])[0] in ("PENDING", "RUNNING"), \
            logs(job)
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job["job_id"]], check=True)
    assert_resumed_exactly(job, run, reference, "SIGTERM")


def test_time_limit_signal_checkpoints_and_the_requeued_job_finishes(reference, tiny_config,
                                                                    tmp_path):
    """--time 2 with SIGUSR2 60 s ahead (slurmctld checks every 30 s and sends it early
    rather than late): the first attempt's steps take longer than that, so the job is
    signalled, saves, is requeued by submitit, and resumes until the planned step (the
    test hook slows only a fresh run: the requeued one ends before its own signal)."""
    run = tmp_path / "run"
    (job,) = submit(["--tasks-per-node", "2", "--time", "2", "--signal-delay", "60",
                     "pretrain", "--config", str(tiny_config), f"out={run}", "-q"], sleep=1.8)
    assert_resumed_exactly(job, run, reference, "SIGUSR2")


def test_a_job_array_runs_each_override_set_in_its_own_run_directory(slurm, tiny_config,
                                                                      tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump([{"trainer.lr": 1e-3}, {"trainer.lr": 2e-3},
                                     {"trainer.lr": 3e-3}]))
    base = tmp_path / "sweep"
    jobs = submit(["--array", str(sweep), "--time", "10", "pretrain", "--config",
                   str(tiny_config), f"out={base}", "trainer.max_steps=3",
                   "trainer.parallel=none", "-q"])
    assert [j["run"] for j in jobs] == [str(base / str(i)) for i in range(3)]
    assert len({j["job_id"].split("_")[0] for j in jobs}) == 1  # one array
    for i, (job, lr) in enumerate(zip(jobs, (1e-3, 2e-3, 3e-3), strict=True)):
        assert wait(job["job_id"]) == "COMPLETED", logs(job)
        run = base / str(i)
        assert train_steps(run) == [1, 2, 3]
        assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["lr"] == lr
        assert json.loads((run / "summary.json").read_text())["status"] == "done"
