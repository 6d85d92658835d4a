"""VQ image tokenizer: quantizer mechanics, a learning check through the trainer, exact resume
after SIGKILL, bad input."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from omnimask.cli import main
from omnimask.config import load_config
from omnimask.errors import OmnimaskError
from omnimask.modalities.image.tokenizer import (
    ImageTokenizer,
    ImageTokenizerConfig,
    load_images,
    psnr,
    train_vq,
    trainer_config,
)
from omnimask.modalities.image.vq import VQVAE, Quantizer, VQConfig
from omnimask.train import checkpoint

TINY = ["vq.quantizer=vq", "vq.downsample=3", "crop=0", "object_weight=0", "edge_weight=0",
        "vq.channels=[16,32,32]", "vq.codebook_size=64", "vq.code_dim=8", "batch_size=16",
        "warmup_steps=5", "log_every=10", "checkpoint_every=10", "max_images=64"]


def test_quantizer_matches_cosine_and_passes_gradients():
    q = Quantizer(VQConfig(quantizer="vq", codebook_size=50, code_dim=8)).eval()  # no EMA update
    z = torch.randn(40, 8, requires_grad=True)
    out, ids, losses = q(z)
    brute = (F.normalize(z, dim=-1) @ F.normalize(q.codebook, dim=-1).T).argmax(1)
    assert torch.equal(ids, brute)
    assert torch.allclose(out, q.lookup(ids), atol=1e-6)  # forward value: the code
    out.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through


def test_ema_moves_codes_and_dead_codes_restart():
    torch.manual_seed(0)
    q = Quantizer(VQConfig(quantizer="vq", codebook_size=8, code_dim=4, decay=0.5, dead_after=3))
    target = F.normalize(torch.tensor([[1.0, 0, 0, 0]]), dim=-1)
    z = target.repeat(16, 1)
    q.train()
    before = q.codes().clone()
    for _ in range(6):  # long enough for every other code to sit idle for 3 steps
        q(z)
    used = q.nearest(target)
    assert F.cosine_similarity(q.codes()[used], target).item() > 0.99  # pulled onto the data
    # every other code went unused for 3 steps: restarted at batch latents (= target)
    others = [i for i in range(8) if i != int(used)]
    assert torch.allclose(q.codes()[others], target.expand(7, 4), atol=1e-5)
    assert not torch.allclose(before, q.codes())


def test_encode_decode_shapes():
    m = VQVAE(VQConfig(quantizer="vq", downsample=3, channels=[8, 16, 16], codebook_size=32,
                       code_dim=4)).eval()
    x = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    ids = m.encode(x)
    assert ids.shape == (3, 64) and ids.dtype == torch.long and 0 <= ids.min() <= ids.max() < 32
    y = m.decode(ids)
    assert y.shape == x.shape and y.dtype == torch.uint8
    with pytest.raises(ValueError, match="code ids must be in"):
        m.decode(ids + 32)
    with pytest.raises(ValueError, match=r"\[B, 64\]"):
        m.decode(ids[:, :10])


def _rows(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_learns_and_logs_through_the_trainer(shapes_dir, tmp_path):
    cfg = load_config(ImageTokenizerConfig, None, TINY + ["max_steps=60"])
    stats = train_vq([str(shapes_dir / "train-*.tar")], tmp_path, cfg, progress=False)
    log = _rows(tmp_path)
    assert stats["steps"] == 60 and [r["step"] for r in log] == list(range(1, 61))
    psnr_db = [r["psnr_db"] for r in log]
    assert sum(psnr_db[-10:]) / 10 > sum(psnr_db[:10]) / 10 + 2  # it learns
    every = [r for r in log if r["step"] % 10 == 0]  # log_every=10: usage and throughput
    assert all(0 < r["usage"] <= 1 and r["images_per_s"] > 0 for r in every)
    assert all("usage" not in r for r in log if r["step"] % 10)
    assert log[0]["lr"] == pytest.approx(2e-3 / 5)  # the trainer's warmup, then its cosine
    assert log[-1]["lr"] == pytest.approx(2e-3 * (0.02 + 0.98 * 0.5 * (1 + math.cos(
        math.pi * 54 / 55))))
    _, st = checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))
    assert st["schedule"]["total"] == 60 and st["config"]["optimizer"] == "adam"
    # TensorBoard: the trainer's scalars and, at the end, training images over their
    # reconstructions
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    ev.Reload()
    assert {"train/psnr_db", "train/usage"} <= set(ev.Tags()["scalars"])
    (img,) = ev.Images("vq/reconstructions")
    assert img.step == 60 and img.width > 3 * img.height  # two labelled rows of 8


def test_time_budget_maps_to_a_time_schedule():
    t = trainer_config(load_config(ImageTokenizerConfig, None, ["max_steps=0", "max_minutes=5"]))
    assert (t.schedule_by, t.max_minutes, t.max_steps) == ("time", 5.0, 0)
    t = trainer_config(load_config(ImageTokenizerConfig, None, ["max_steps=7", "max_minutes=2"]))
    assert (t.schedule_by, t.max_minutes, t.max_steps) == ("steps", 2.0, 7)  # a cap only
    t = trainer_config(load_config(ImageTokenizerConfig, None, ["max_steps=7"]))
    assert (t.schedule_by, t.max_minutes, t.max_steps) == ("steps", 0.0, 7)
    assert (t.betas, t.clip, t.min_lr_ratio) == ([0.9, 0.99], 1.0, 0.02)


_TRAIN = ("import sys; from omnimask.config import load_config; "
          "from omnimask.modalities.image.tokenizer import ImageTokenizerConfig, train_vq; "
          "train_vq([sys.argv[1]], sys.argv[2], "
          "load_config(ImageTokenizerConfig, None, sys.argv[3:]), progress=False)")


def test_killed_and_resumed_run_equals_an_unbroken_one(shapes_dir, tmp_path, caplog):
    data = [str(shapes_dir / "train-*.tar")]
    over = TINY + ["max_steps=20", "vq.dead_after=3"]  # dead-code restarts draw from the RNG
    cfg = load_config(ImageTokenizerConfig, None, over)
    train_vq(data, tmp_path / "a", cfg, progress=False)
    killed = subprocess.run([sys.executable, "-c", _TRAIN, data[0], str(tmp_path / "b"), *over],
                            env={**os.environ, "OMNIMASK_TEST_SIGKILL_AT": "13"},
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ck = tmp_path / "b" / "checkpoints"
    assert [p.name for p in checkpoint.complete(ck)] == ["step_00000010"]
    # half-written folders of a kill: ignored
    shutil.copytree(ck / "step_00000010", ck / "step_00000014.tmp")
    (ck / "step_00000012").mkdir()  # no COMPLETE marker
    assert train_vq(data, tmp_path / "b", cfg, progress=False)["steps"] == 20
    a = ImageTokenizer.load(tmp_path / "a").model.state_dict()
    b = ImageTokenizer.load(tmp_path / "b").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    same = ("step", "loss", "psnr_db", "lr", "usage", "restarts")
    rows = [{k: r.get(k) for k in same} for r in _rows(tmp_path / "b")]
    assert rows == [{k: r.get(k) for k in same} for r in _rows(tmp_path / "a")]
    assert rows[19]["restarts"] > 0  # after the resume too
    # another budget on resume: the checkpoint's schedule is kept, and said so
    with caplog.at_level(logging.WARNING):
        more = train_vq(data, tmp_path / "b", load_config(ImageTokenizerConfig, None,
                                                          TINY + ["max_steps=40"]), progress=False)
    assert more["steps"] == 20 and "schedule of the checkpoint (20 steps)" in caplog.text


def test_cli_train_eval_and_bad_input(shapes_dir, tmp_path):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "image", "--data", str(shapes_dir / "train-*.tar"),
                 "--out", str(out), "max_steps=10", *TINY, "-q"]) == 0
    assert main(["tokenizer", "eval", "image", "--tokenizer", str(out), "--data",
                 str(shapes_dir / "test-novel-*.tar"), "--out", str(tmp_path / "m.json"), "-q"]) == 0
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert m["images"] == 30 and m["tokens_per_image"] == 64 and 0 < m["usage"] <= 1
    assert 5 < m["psnr_db"] < 60 and (tmp_path / "m_recon.png").is_file()
    tok = ImageTokenizer.load(out)
    imgs = load_images([str(shapes_dir / "test-novel-*.tar")], 64, limit=4)
    assert torch.equal(tok.encode(imgs), tok.model.encode(imgs))
    # other sizes and modes are converted
    pil = [Image.fromarray(imgs[0].permute(1, 2, 0).numpy()).resize((96, 96)).convert("L"),
           Image.fromarray(imgs[1].permute(1, 2, 0).numpy()).convert("RGBA"),
           np.zeros((64, 64), np.uint8)]
    assert tok.encode(pil).shape == (3, 64)
    assert tok.encode(F.interpolate(imgs.float(), 32).to(torch.uint8)).shape == (4, 64)
    with pytest.raises(OmnimaskError, match="float tensor"):
        tok.encode(imgs.float() / 255)
    with pytest.raises(OmnimaskError, match=r"\[B, 3, H, W\]"):
        tok.encode(imgs[:, :1])
    with pytest.raises(OmnimaskError, match="image 0: expected a uint8"):
        tok.encode([np.zeros((64, 64, 3), np.float32)])
    with pytest.raises(OmnimaskError, match="not an image tokenizer"):
        ImageTokenizer.load(tmp_path)


def test_psnr():
    a = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[1] += 10
    p = psnr(a, b)
    assert p[0] > 90 and abs(float(p[1]) - 10 * np.log10(255 ** 2 / 100)) < 1e-4


def test_straight_through_codebook_gets_gradients():
    m = VQVAE(VQConfig(quantizer="vq", downsample=3, channels=[8, 16, 16], codebook_size=16,
                       code_dim=4, ema=False))
    assert isinstance(m.quantizer.codebook, torch.nn.Parameter)
    x = m.to_input(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    _, _, losses = m(x)
    assert set(losses) == {"recon", "commit", "codebook"}
    sum(losses.values()).backward()
    assert m.quantizer.codebook.grad.abs().sum() > 0 and m.encoder[0].weight.grad.abs().sum() > 0


def test_bf16_convolutions_compute_the_fp32_forward_to_bf16_precision():
    torch.manual_seed(0)
    m = VQVAE(VQConfig(quantizer="vq", downsample=3, channels=[8, 16, 16], codebook_size=32,
                       code_dim=4)).eval()  # no EMA
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    seen = []
    m.quantizer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    ref_recon, ref_ids, ref_losses = m(x)
    m.conv_dtype = torch.bfloat16
    recon, ids, losses = m(x)
    assert seen == [torch.float32, torch.float32]  # the quantiser matches in fp32 either way
    assert recon.dtype == torch.float32 and losses["recon"].dtype == torch.float32
    assert (ids == ref_ids).float().mean() > 0.8  # near-ties may flip under bf16 rounding
    same = (ids == ref_ids).view(4, 1, 8, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)
    assert (recon - ref_recon).abs()[same.expand_as(recon)].max() < 0.05  # bf16's ~3 digits
    assert losses["recon"].item() == pytest.approx(ref_losses["recon"].item(), rel=0.05)


def test_bf16_training_learns_and_the_saved_tokenizer_runs_in_fp32(shapes_dir, tmp_path):
    from omnimask.modalities.image.tokenizer import conv_dtype
    from omnimask.train.trainer import native_bf16

    assert conv_dtype("fp32") is None and conv_dtype("bf16") == torch.bfloat16
    assert conv_dtype("auto") == (torch.bfloat16 if native_bf16("cpu") else None)
    cfg = load_config(ImageTokenizerConfig, None, TINY + ["max_steps=60", "precision=bf16"])
    stats = train_vq([str(shapes_dir / "train-*.tar")], tmp_path, cfg, progress=False)
    assert stats["precision"] == "bf16"
    psnr_db = [r["psnr_db"] for r in _rows(tmp_path)]
    assert sum(psnr_db[-10:]) / 10 > sum(psnr_db[:10]) / 10 + 2  # it learns
    tok = ImageTokenizer.load(tmp_path)
    assert tok.model.conv_dtype is None
    assert {p.dtype for p in tok.model.parameters()} == {torch.float32}
    with pytest.raises(OmnimaskError, match=r"precision must be fp32\|bf16\|auto"):
        load_config(ImageTokenizerConfig, None, ["precision=fp16"])


def test_grid_crops_cut_each_image_on_the_code_grid():
    from omnimask.modalities.image.tokenizer import grid_crops

    x = torch.arange(6 * 3 * 32 * 32, dtype=torch.float32).view(6, 3, 32, 32)
    crops = grid_crops(x, 16, 8, torch.Generator().manual_seed(0))
    assert crops.shape == (6, 3, 16, 16)
    corners = set()
    for im, c in zip(x, crops):
        (hit,) = [(y, s) for y in range(17) for s in range(17)
                  if torch.equal(im[:, y:y + 16, s:s + 16], c)]
        assert hit[0] % 8 == 0 and hit[1] % 8 == 0  # the patch grid's phase
        corners.add(hit)
    assert len(corners) > 1  # each image its own corner
    for bad in ("crop=12", "crop=72", "crop=-8"):  # off the 8-pixel grid, past the image
        with pytest.raises(OmnimaskError, match="crop must be 0 or a multiple of 8"):
            load_config(ImageTokenizerConfig, None, ["vq.downsample=3", bad])


def test_trained_on_crops_it_reconstructs_whole_images(shapes_dir, tmp_path):
    images = load_images([str(shapes_dir / "test-novel-*.tar")], 64, 16)
    scores = {}
    for crop in (0, 32):  # whole images, and quarters of them (4 x 4 of the 8 x 8 codes)
        cfg = load_config(ImageTokenizerConfig, None, TINY + ["max_steps=60", f"crop={crop}"])
        train_vq([str(shapes_dir / "train-*.tar")], tmp_path / str(crop), cfg, progress=False)
        tok = ImageTokenizer.load(tmp_path / str(crop))
        with torch.no_grad():
            ids = tok.model.encode(images)
            assert ids.shape == (16, 64)  # the whole image's 8 x 8 codes
            scores[crop] = float(psnr(images, tok.decode(ids)).mean())
    untrained = VQVAE(tok.model.cfg).eval()
    with torch.no_grad():
        base = float(psnr(images, untrained.decode(untrained.encode(images))).mean())
    # it learns on crops what serves whole images (behind them at equal steps: a quarter
    # of the pixels per step)
    assert scores[32] > base + 1 and scores[0] > base + 1
