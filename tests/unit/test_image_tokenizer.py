"""VQ image tokenizer: quantizer mechanics, a learning check, exact resume, bad input."""

from __future__ import annotations

import json
import shutil

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
)
from omnimask.modalities.image.vq import VQVAE, Quantizer, VQConfig
from omnimask.train import checkpoint

TINY = ["vq.channels=[16,32,32]", "vq.codebook_size=64", "vq.code_dim=8", "batch_size=16",
        "warmup_steps=5", "log_every=10", "checkpoint_every=10", "max_images=64"]


def test_quantizer_matches_cosine_and_passes_gradients():
    q = Quantizer(VQConfig(codebook_size=50, code_dim=8)).eval()  # no EMA update
    z = torch.randn(40, 8, requires_grad=True)
    out, ids, losses = q(z)
    brute = (F.normalize(z, dim=-1) @ F.normalize(q.codebook, dim=-1).T).argmax(1)
    assert torch.equal(ids, brute)
    assert torch.allclose(out, q.lookup(ids), atol=1e-6)  # forward value: the code
    out.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through


def test_ema_moves_codes_and_dead_codes_restart():
    torch.manual_seed(0)
    q = Quantizer(VQConfig(codebook_size=8, code_dim=4, decay=0.5, dead_after=3))
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
    m = VQVAE(VQConfig(channels=[8, 16, 16], codebook_size=32, code_dim=4)).eval()
    x = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    ids = m.encode(x)
    assert ids.shape == (3, 64) and ids.dtype == torch.long and 0 <= ids.min() <= ids.max() < 32
    y = m.decode(ids)
    assert y.shape == x.shape and y.dtype == torch.uint8
    with pytest.raises(ValueError, match="code ids must be in"):
        m.decode(ids + 32)
    with pytest.raises(ValueError, match=r"\[B, 64\]"):
        m.decode(ids[:, :10])


def test_learns_and_resumes_exactly(shapes_dir, tmp_path):
    data = [str(shapes_dir / "train-*.tar")]
    learn = load_config(ImageTokenizerConfig, None, TINY + ["max_steps=100"])
    train_vq(data, tmp_path / "learn", learn, progress=False)
    log = [json.loads(ln) for ln in (tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["psnr_db"] > log[0]["psnr_db"] + 2  # it learns
    cfg = load_config(ImageTokenizerConfig, None, TINY + ["max_steps=30"])
    train_vq(data, tmp_path / "a", cfg, progress=False)
    # interrupted run: the last checkpoint lost, half-written folders that must be ignored
    train_vq(data, tmp_path / "b", cfg, progress=False)
    ck = tmp_path / "b" / "checkpoints"
    shutil.copytree(ck / "step_00000030", ck / "step_00000031.tmp")
    shutil.rmtree(ck / "step_00000030")
    (ck / "step_00000026").mkdir()  # no COMPLETE marker
    assert checkpoint.latest(ck).name == "step_00000020"
    train_vq(data, tmp_path / "b", cfg, progress=False)
    a = ImageTokenizer.load(tmp_path / "a").model.state_dict()
    b = ImageTokenizer.load(tmp_path / "b").model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    with pytest.raises(OmnimaskError, match="budget"):
        train_vq(data, tmp_path / "b", load_config(ImageTokenizerConfig, None,
                                                    TINY + ["max_steps=40"]), progress=False)


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
    m = VQVAE(VQConfig(channels=[8, 16, 16], codebook_size=16, code_dim=4, ema=False))
    assert isinstance(m.quantizer.codebook, torch.nn.Parameter)
    x = m.to_input(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    _, _, losses = m(x)
    assert set(losses) == {"recon", "commit", "codebook"}
    sum(losses.values()).backward()
    assert m.quantizer.codebook.grad.abs().sum() > 0 and m.encoder[0].weight.grad.abs().sum() > 0
