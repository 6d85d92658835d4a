"""Data-parallel training through the one loop, on CPU (gloo), 2 processes via torchrun:
DDP and FSDP2 reproduce one process with 2x accumulation, and checkpoints move between
world sizes (elastic resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omnimask.safeio import load_tree

WORKER = Path(__file__).with_name("dist_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def launch(run: Path, world: int, **overrides) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(WORKER), str(run), json.dumps(overrides)]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}", *args]
    else:
        cmd = [sys.executable, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["world"] == world and out["summary"]["status"] == "done"
    return out["summary"]


def rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def final(run: Path, step: int = 20) -> tuple[dict, dict]:
    d = run / "checkpoints" / f"step_{step:08d}"
    return load_file(str(d / "model.safetensors")), load_tree(d / "state.safetensors")


def assert_same_weights(wa: dict, wb: dict, atol: float = 1e-6) -> None:
    """Every weight to ``atol``, but the attention's key bias to 1e-4: softmax ignores a
    shift shared by all keys, so its gradient is only rounding noise, which Adam scales up
    into differences of a few 1e-6 between reduction orders (FSDP's, one process's)."""
    assert set(wa) == set(wb)
    for k in wa:
        x, y = wa[k], wb[k]
        if k.endswith("attn.qkv.bias"):
            d = x.shape[0] // 3
            torch.testing.assert_close(x[d:2 * d], y[d:2 * d], atol=1e-4, rtol=0)
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def assert_same_run(a: Path, b: Path, atol: float = 1e-6) -> None:
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, 21))
    for x, y in zip(ra, rb, strict=True):
        assert x["tokens"] == y["tokens"]
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    (wa, sa), (wb, sb) = final(a), final(b)
    assert_same_weights(wa, wb, atol)
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert set(oa) == set(ob)
    for i in oa:
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(oa[i][k], ob[i][k], atol=atol, rtol=1e-5)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("dist") / "single"
    launch(run, 1, accumulate=2)
    return run


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_reproduce_one_process_with_twice_the_accumulation(single, tmp_path,
                                                                    parallel):
    launch(tmp_path / parallel, 2, parallel=parallel)
    assert_same_run(single, tmp_path / parallel)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_checkpoint_moves_between_world_sizes(single, tmp_path, parallel):
    """2 ranks resume what 1 process wrote at step 10, and 1 process resumes what 2 ranks
    wrote: both end where the unbroken single run ends."""
    mid = single / "checkpoints" / "step_00000010"
    launch(tmp_path / "up", 2, parallel=parallel, resume=str(mid))
    (w, _), (w_up, _) = final(single), final(tmp_path / "up")
    two = tmp_path / "two"
    launch(two, 2, parallel=parallel, max_steps=20)
    launch(tmp_path / "down", 1, accumulate=2, parallel=parallel,
           resume=str(two / "checkpoints" / "step_00000010"))
    (w_down, _) = final(tmp_path / "down")
    assert_same_weights(w_up, w)
    assert_same_weights(w_down, w)


def test_launched_as_two_processes_without_a_parallel_mode_is_an_error(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2", str(WORKER), str(tmp_path / "r"), "{}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0
    assert "trainer.parallel=none" in p.stderr


def _finetune(run: Path, model_dir: Path, shapes_dir: Path, world: int, task: str = "vqa",
              **trainer) -> None:
    args = ["finetune", task, "--init", str(model_dir), "--config", "shapes_tasks",
            f"out={run}", f"data.train=[{shapes_dir}/test-novel-*.tar]",
            f"data.val=[{shapes_dir}/test-novel-*.tar]", "data.val_limit=8",
            "trainer.max_steps=6", "trainer.batch_size=4", "trainer.eval_every=3",
            "trainer.checkpoint_every=3", "trainer.warmup_steps=1", "trainer.lr=1e-3",
            "trainer.tensorboard=false", "trainer.threads=1", "trainer.device=cpu", "-q",
            *[f"trainer.{k}={v}" for k, v in trainer.items()]]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={world}"] if world > 1 else [sys.executable])
    p = subprocess.run([*launcher, "-m", "omnimask.cli", *args], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count(str(run / "model")) == 1  # rank 0 alone reports


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_fine_tuning_on_two_ranks_equals_one_process(tiny_model_dir, shapes_dir,
                                                     tmp_path_factory, parallel):
    """omnimask finetune under torchrun: the same weights as one process with twice the
    accumulation, one exported model, one best.json, rank 0's metrics only."""
    base = tmp_path_factory.mktemp("ft")
    one = base / "one"
    if not (one / "summary.json").is_file():
        _finetune(one, tiny_model_dir, shapes_dir, 1, accumulate=2)
    two = base / parallel
    _finetune(two, tiny_model_dir, shapes_dir, 2, parallel=parallel)
    a = load_file(str(one / "checkpoints" / "step_00000006" / "model.safetensors"))
    b = load_file(str(two / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert set(a) == set(b)
    # BatchNorm's running statistics are estimates: one process updates them after every
    # micro-batch, each rank after its own (DDP then broadcasts rank 0's); training-mode
    # outputs and so the parameters do not depend on them
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert any(k.endswith(stats) for k in a)
    for k in a:
        if not k.endswith(stats):
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    assert [r["step"] for r in rows(two) if r["split"] == "train"] == list(range(1, 7))
    assert json.loads((two / "model" / "metrics.json").read_text())["step"] in (3, 6)
    assert (two / "model" / "model.safetensors").is_file()


def test_ddp_validates_with_the_ema(tiny_model_dir, shapes_dir, tmp_path):
    """Two DDP ranks with an EMA: validation swaps the averaged weights in by the module's
    own parameter names (the wrapper's carry a "module." prefix)."""
    run = tmp_path / "ema"
    _finetune(run, tiny_model_dir, shapes_dir, 2, parallel="ddp", ema=0.9)
    assert [r["step"] for r in rows(run) if r["split"] == "val"][-1] == 6


def test_itc_negatives_and_the_vq_codebook_span_the_ranks(tmp_path):
    """Two ranks with 4 rows each: their mean loss is one process's loss on all 8 rows,
    and each rank's gradients (summed back through the all-gather, then averaged as DDP
    does) are that process's gradients of its rows; without grad each rank scores alone."""
    import torch.nn.functional as F

    from omnimask.heads.matching import info_nce

    from .collectives_worker import rows

    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2", str(WORKER.with_name("collectives_worker.py")),
                        str(tmp_path)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    t, v = (x.clone().requires_grad_() for x in rows(0))
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    full = info_nce(F.normalize(t, dim=-1), F.normalize(v, dim=-1), scale)
    full.backward()
    assert sum(r["loss"] for r in out) / 2 == pytest.approx(float(full.detach()), rel=1e-12)
    for r in out:
        sl = slice(4 * r["rank"], 4 * r["rank"] + 4)
        torch.testing.assert_close(torch.tensor(r["t_grad"], dtype=torch.float64) / 2,
                                   t.grad[sl])
        torch.testing.assert_close(torch.tensor(r["v_grad"], dtype=torch.float64) / 2,
                                   v.grad[sl])
        with torch.no_grad():
            alone = info_nce(F.normalize(t[sl], dim=-1), F.normalize(v[sl], dim=-1), scale)
        assert r["no_grad_loss"] == pytest.approx(float(alone), rel=1e-12)
    assert sum(r["scale_grad"] for r in out) / 2 == pytest.approx(float(scale.grad), rel=1e-9)
    # the VQ's EMA update: without restarts both ranks hold one process's codebook after
    # the same rows; with restarts (rank 0's latents) both ranks still hold the same one
    from .collectives_worker import latents, quantizer

    q = quantizer(100)
    for step in range(3):
        z = F.normalize(latents(step), dim=-1)
        q._update(z, q.nearest(z))
    assert q.restarts == 0
    for r in out:
        torch.testing.assert_close(torch.tensor(r["no_restarts"]["ema_count"]), q.ema_count)
        torch.testing.assert_close(torch.tensor(r["no_restarts"]["codebook"]), q.codebook)
    a, b = out[0]["restarts"]["codebook"], out[1]["restarts"]["codebook"]
    assert a == b and a != out[0]["no_restarts"]["codebook"]


def test_the_image_tokenizer_trains_on_two_ranks(shapes_dir, tmp_path):
    from omnimask.modalities.image.tokenizer import ImageTokenizer

    out = tmp_path / "vq"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2", "-m", "omnimask.cli", "tokenizer", "train",
                        "image", "--data", str(shapes_dir / "train-*.tar"), "--out", str(out),
                        "max_steps=4", "vq.quantizer=vq", "vq.codebook_size=64", "batch_size=8",
                        "parallel=ddp",
                        "threads=1", "-q"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("kind: image") == 1  # rank 0 reports
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    assert ImageTokenizer.load(out).size == 64


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_the_process_group_carries_cpu_and_cuda_tensors(monkeypatch, device):
    """On GPUs the group is nccl for CUDA tensors and gloo for the CPU scalars the ranks agree
    on each step (nccl alone refuses a CPU tensor); gloo on CPU. No GPU needed: the calls
    into torch are recorded, not made."""
    import torch.distributed as dist

    from omnimask.train import distributed as D

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(
        backend=backend, **kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.update(cuda=i))
    monkeypatch.setattr(D.atexit, "register", lambda fn: None)
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost",
                 "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)
    assert D.setup(torch.device(device)) is True
    assert seen["rank"] == 1 and seen["world_size"] == 2
    if device == "cpu":
        assert seen["backend"] == "gloo" and "cuda" not in seen
    else:
        assert seen["backend"] == "cpu:gloo,cuda:nccl" and seen["cuda"] == 1


def test_each_process_takes_its_own_visible_gpu(monkeypatch):
    """torchrun's local ranks over the GPUs a process sees (a launcher binding one GPU per
    task leaves each process GPU 0); an explicit GPU index with several ranks is refused."""
    from omnimask.errors import ConfigError
    from omnimask.train import distributed as D

    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(k, v)
    for visible, want in ((4, 3), (1, 0), (2, 1)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda n=visible: n)
        assert D.device_for_rank(torch.device("cuda")) == torch.device("cuda", want)
    assert D.device_for_rank(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="trainer.device=cuda:1"):
        D.device_for_rank(torch.device("cuda", 1))


def test_caption_validates_under_fsdp(tiny_model_dir, shapes_dir, tmp_path):
    """Caption validation decodes through the KV cache (``Trunk.step``, not a forward): under
    FSDP the blocks it calls must be gathered for it as for a forward."""
    run = tmp_path / "cap"
    _finetune(run, tiny_model_dir, shapes_dir, 2, task="caption", parallel="fsdp")
    assert [r["step"] for r in rows(run) if r["split"] == "val"][-1] == 6
