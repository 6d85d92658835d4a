"""Image tokenizer variants: finite scalar quantisation, the 4 px grid, the object-weighted
and edge losses, region PSNR and the judge's scores of reconstructions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from omnimask.cli import main
from omnimask.config import load_config
from omnimask.errors import OmnimaskError
from omnimask.modalities.image.tokenizer import (
    ImageTokenizer,
    ImageTokenizerConfig,
    object_pixels,
    recon_loss,
    region_psnr,
)
from omnimask.modalities.image.vq import VQVAE, FSQuantizer, ResidualQuantizer, VQConfig
from omnimask.train.data.shapesworld.judge import ShapeClassifier


def test_fsq_ids_grid_and_straight_through():
    cfg = VQConfig(quantizer="fsq", fsq_levels=[4, 3, 5])
    assert cfg.size == 60 and cfg.dim == 3
    q = FSQuantizer(cfg)
    z = (torch.randn(500, 3) * 3).requires_grad_()
    values, ids, losses = q(z)
    assert losses == {} and ids.min() >= 0 and ids.max() < 60
    # the id's grid point is the rounded value, and every value is on its level grid
    assert torch.allclose(q.lookup(ids), values.detach())
    for i, n in enumerate([4, 3, 5]):
        steps = values[:, i].detach() * (n // 2)
        assert torch.equal(steps, steps.round()) and steps.min() >= -(n // 2)
        assert steps.max() <= n - 1 - n // 2
    # brute force: the id is the mixed-radix number of the levels, first dimension fastest
    lv = (values.detach() * torch.tensor([2.0, 1.0, 2.0])).round().long() + torch.tensor([2, 1, 2])
    assert torch.equal(ids, lv[:, 0] + 4 * lv[:, 1] + 12 * lv[:, 2])
    # all 60 grid points are distinct, as are their unit vectors, each its own nearest
    assert len({tuple(r.tolist()) for r in q.grid}) == 60
    assert torch.allclose(q.codes().norm(dim=-1), torch.ones(60))
    assert torch.equal(q.nearest(q.codes()), torch.arange(60))
    # straight-through: the gradient reaches the latents
    values.sum().backward()
    assert z.grad is not None and bool((z.grad != 0).any())


def test_defaults_are_the_fsq_on_4px_patches_and_vq_keeps_its_own_sizes():
    d = load_config(ImageTokenizerConfig)  # what `omnimask tokenizer train image` trains
    assert (d.vq.quantizer, d.vq.tokens_side, d.vq.size, d.vq.dim) == ("fsq", 16, 1000, 4)
    assert (d.object_weight, d.edge_weight, d.crop, d.max_steps) == (4.0, 0.5, 32, 3000)
    # fsq's sizes are derived, not written over vq's: switching back gets vq's defaults
    vq = load_config(ImageTokenizerConfig, None, ["vq.quantizer=vq"]).vq
    assert (vq.size, vq.dim) == (1024, 32) and VQVAE(vq).quantizer.codebook.shape == (1024, 32)
    assert load_config(ImageTokenizerConfig, None, ["vq.quantizer=vq", "vq.codebook_size=128"]
                       ).vq.size == 128


def test_grids_and_quantizers_encode_decode_shapes():
    vq = dict(quantizer="vq", codebook_size=16, code_dim=4)
    for cfg, tokens in ((VQConfig(downsample=3, channels=[8, 8, 8], **vq), 64),
                        (VQConfig(downsample=2, channels=[8, 8], **vq), 256),
                        (VQConfig(downsample=3, channels=[8, 8, 8], quantizer="fsq",
                                  fsq_levels=[3, 3]), 64)):
        m = VQVAE(cfg).eval()
        assert cfg.tokens_side ** 2 == tokens
        x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
        ids = m.encode(x)
        assert ids.shape == (2, tokens) and int(ids.max()) < cfg.size
        assert m.decode(ids).shape == (2, 3, 64, 64)
        z = m.unit_latents(x)
        assert z.shape == (2, tokens, m.quantizer.codes().shape[1])
        # the training forward's ids are encode's
        _, fids, _ = m(m.to_input(x))
        assert torch.equal(fids, ids)
    assert VQConfig(downsample=2).stage_channels == [64, 128]
    assert VQConfig(downsample=3).stage_channels == [32, 64, 128]
    # the tokenizer config's override alone: the stages' default channels follow
    tc = load_config(ImageTokenizerConfig, None, ["vq.downsample=3"])
    assert tc.vq.stage_channels == [32, 64, 128] and VQVAE(tc.vq).cfg.tokens_side == 8
    with pytest.raises(ValueError, match="channels must be 2 sizes"):
        VQConfig(downsample=2, channels=[8, 8, 8])
    with pytest.raises(ValueError, match=r"quantizer must be vq\|fsq\|rq"):
        VQConfig(quantizer="pq")
    with pytest.raises(ValueError, match="fsq_levels"):
        VQConfig(quantizer="fsq", fsq_levels=[8, 1])


def test_residual_quantizer_is_greedy_over_levels_and_decodes_the_sum():
    cfg = VQConfig(downsample=3, channels=[8, 8, 8], quantizer="rq", rq_depth=3,
                   codebook_size=16, code_dim=4)
    assert cfg.depth == 3 and cfg.tokens_per_image == 192
    q = ResidualQuantizer(cfg)
    torch.manual_seed(0)
    z = torch.randn(300, 4)
    q.init_kmeans(z)
    ids = q.ids(z)
    # brute force: level k takes the code nearest to what levels < k left over
    r = z.clone()
    for k, level in enumerate(q.levels):
        d = torch.cdist(r.double(), level.codebook.double())
        assert torch.equal(ids[:, k], d.argmin(1))
        r = r - level.codebook[ids[:, k]]
    assert torch.allclose(q.lookup(ids), z - r, atol=1e-6)
    # each level lowers the error (k-means on the residuals)
    errs = [(z - sum(q.levels[j].lookup(ids[:, j]) for j in range(k + 1))).pow(2).sum(1).mean()
            for k in range(3)]
    assert errs[0] > errs[1] > errs[2]
    # training forward: the same ids, straight-through gradients, Euclidean EMA means
    q.train()
    zz = z.clone().requires_grad_()
    out, fids, losses = q(zz)
    assert torch.equal(fids, ids) and set(losses) == {"commit"}
    out.sum().backward()
    assert torch.allclose(zz.grad, torch.ones_like(zz))
    level = q.levels[0]
    assert torch.allclose(level.codebook, level.ema_sum / level.ema_count[:, None], atol=1e-6)
    # the vocabulary's rows: level k's code c at row k * 16 + c; a stack's vector their sum
    rows = q.codes()
    assert rows.shape == (48, 4) and torch.equal(rows[16:32], q.levels[1].codebook)
    assert torch.allclose(q.lookup(ids), rows[ids + torch.arange(3) * 16].sum(1))
    assert torch.equal(q.unit(z), z)  # matched by distance: latents as they are
    with pytest.raises(OmnimaskError, match="stack of ids per position"):
        q.nearest(z)
    m = VQVAE(cfg).eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    e = m.encode(x)  # raster order, depth innermost
    assert e.shape == (2, 192)
    assert torch.equal(e.view(2, 64, 3), m.quantizer.ids(m.latents(m.to_input(x))).view(2, 64, 3))
    assert torch.equal(m(m.to_input(x))[1], e) and m.decode(e).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"shape \[B, 192\]"):
        m.decode(e[:, :64])


def test_default_layout_keeps_the_saved_tokenizers_keys():
    keys = set(VQVAE(VQConfig(quantizer="vq", downsample=3)).state_dict())
    assert {"encoder.0.weight", "encoder.2.weight", "encoder.4.weight", "encoder.8.weight",
            "decoder.0.weight", "decoder.4.weight", "decoder.7.weight",
            "decoder.10.weight"} <= keys
    assert "decoder.11.weight" not in keys


def test_tokenizers_saved_before_the_grid_and_quantizer_fields_load_as_8x8_vq(tmp_path):
    m = VQVAE(VQConfig(quantizer="vq", downsample=3, channels=[8, 8, 8], codebook_size=16,
                       code_dim=4)).eval()
    ImageTokenizer(m).save(tmp_path)
    meta = tmp_path / "image_tokenizer.json"
    info = json.loads(meta.read_text())
    for k in ("downsample", "quantizer", "rq_depth", "fsq_levels"):  # as older releases wrote
        del info["vq"][k]
    meta.write_text(json.dumps(info))
    tok = ImageTokenizer.load(tmp_path)
    assert (tok.model.cfg.quantizer, tok.model.cfg.tokens_side, tok.size) == ("vq", 8, 16)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(tok.model.encode(x), m.encode(x))


def test_object_weighted_and_edge_losses_by_hand():
    x = torch.full((1, 3, 4, 4), -0.5)
    x[0, 0, 0, 0] = 0.9  # one saturated pixel: red
    obj = object_pixels(x)[0, 0]
    assert obj[:2, :2].all() and obj.sum() == 4  # the pixel and its 3x3 neighbourhood
    recon = x.clone()
    recon[0, :, 3, 3] += 0.3  # an error on the background only
    mse = float((recon - x).pow(2).mean())
    assert recon_loss(recon, x) == pytest.approx(mse)
    # weights 1 + 3 on 4 of 16 pixels: mean weight 1.75; the error pixel weighs 1
    assert float(recon_loss(recon, x, object_weight=3.0)) == pytest.approx(mse / 1.75)
    # edge term: the corner pixel is in one difference per direction and channel, of the
    # 3 x 4 x 3 each direction has
    edge = (3 * 0.3 / (3 * 4 * 3)) * 2
    assert float(recon_loss(recon, x, edge_weight=1.0)) == pytest.approx(mse + edge)


def test_region_psnr_separates_objects_from_background():
    a = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    a[0, 0, 2:4, 2:4] = 250  # a saturated square: objects are it plus a 1 px outline
    b = a.clone()
    b[0, :, 7, 7] += 10  # background error only
    r = region_psnr(a, b)
    assert r["object_pixel_share"] == pytest.approx(16 / 64)
    # no error: the 1e-10 floor
    assert r["psnr_objects_db"] == pytest.approx(10 * math.log10(255 ** 2 / 1e-10), abs=1e-3)
    assert r["psnr_background_db"] == pytest.approx(10 * math.log10(255 ** 2 / (100 / 48)),
                                                    abs=1e-3)


def test_eval_reports_regions_and_the_judge(shapes_dir, tmp_path):
    out = tmp_path / "tok"
    ImageTokenizer(VQVAE(VQConfig(downsample=3, channels=[8, 8, 8], fsq_levels=[3, 3]))
                   ).save(out)
    judge = tmp_path / "judge.safetensors"  # an untrained judge: only the plumbing is tested
    save_file(ShapeClassifier().state_dict(), judge)
    assert main(["tokenizer", "eval", "image", "--tokenizer", str(out), "--data",
                 str(shapes_dir / "test-novel-*.tar"), "--out", str(tmp_path / "m.json"),
                 "--judge", str(judge), "-q"]) == 0
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert m["size"] == 9 and m["images"] == 30
    assert 0 < m["object_pixel_share"] < 1 and m["psnr_objects_db"] < 60
    assert 0 <= m["judge_shape_chance"] < 1 and 0 <= m["judge_shape"] <= 1
    assert 0 <= m["judge_shape_originals"] <= 1 and 0 <= m["judge_color"] <= 1
    rq = tmp_path / "rq"  # residual: tokens are positions x depth, usage per level
    ImageTokenizer(VQVAE(VQConfig(downsample=3, channels=[8, 8, 8], quantizer="rq", rq_depth=2,
                                  codebook_size=8, code_dim=4))).save(rq)
    assert main(["tokenizer", "eval", "image", "--tokenizer", str(rq), "--data",
                 str(shapes_dir / "test-novel-*.tar"), "--out", str(tmp_path / "r.json"),
                 "-q"]) == 0
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert m["tokens_per_image"] == 128 and len(m["usage_per_level"]) == 2
    assert all(0 < u <= 1 for u in m["usage_per_level"])
    assert main(["tokenizer", "eval", "text", "--tokenizer", str(out), "--data",
                 str(shapes_dir / "test-novel-*.tar"), "--judge", str(judge)]) == 2


def test_pretraining_reads_a_16x16_fsq_tokenizer_and_draws_with_it(shapes_dir, tiny_tokenizers,
                                                                  tmp_path):
    """The pixel encoder's grid follows a 4 px tokenizer (its conv stem keeps its first two
    stages, no override needed); CM3 and MaskGIT samples then carry 256 image codes and the
    end of the run draws images of 256 codes (MaskGIT's parallel rounds)."""
    from omnimask.train.pretrain import PretrainConfig, Pretraining

    img = tmp_path / "image16"
    ImageTokenizer(VQVAE(VQConfig(downsample=2, channels=[8, 8], quantizer="fsq",
                                  fsq_levels=[4, 4]))).save(img)
    t = tiny_tokenizers
    cfg = load_config(PretrainConfig, None, [
        "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=0",
        "trainer.warmup_steps=1", "data.val_batch_size=4", "generate.captions=1",
        "generate.images=1", "generate.candidates=2", "generate.sampler=maskgit",
        "generate.steps=2", "generate.order=random",
        "objectives.mix={cm3: 1, mim: 1, maskgit: 1}",
        "objectives.mix_start={}"], **{
        "out": str(tmp_path / "run"),
        "data": {"train": [str(shapes_dir / "train-*.tar")],
                 "val": [str(shapes_dir / "test-novel-*.tar")]},
        "tokenizers": {"text": str(t / "text"), "image": str(img)},
        "model": {"trunk": {"dim": 32, "layers": 1, "heads": 2, "ffn_dim": 64,
                            "max_positions": 512}, "image_input": "pixels",
                  "image_encoder": {"channels": [8, 16, 32], "stem_channels": 8}}})
    pre = Pretraining(cfg, progress=False)
    enc = pre.model.cfg.image_encoder
    assert enc.grid == 16 and list(enc.channels) == [8, 16]
    s = pre.fit()
    assert s["status"] == "done" and s["step"] == 2
    assert Path(s["samples"]["images_png"]).is_file()
    mg = s["samples"]["grounding"]["maskgit"]  # the sampler's own grounding, every code
    assert mg["object_codes_given_caption"] > 0 and mg["codes_given_other_caption"] > 0


def test_pretraining_reads_an_rq_tokenizer_and_draws_its_stacks(shapes_dir, tiny_tokenizers,
                                                                 tmp_path):
    """An rq tokenizer's id stacks: the corpus keeps each position's stack (depth innermost,
    as the tokenizer encodes), the vocabulary gives each level its own rows, every image-code
    objective trains on them, the end of the run captions with CM3 and draws with MaskGIT
    (CM3, one code per position, is refused as the sampler), and ``eval generate`` draws
    stacks."""
    from omnimask.errors import ConfigError
    from omnimask.train.pretrain import PretrainConfig, Pretraining

    img = tmp_path / "rq"
    ImageTokenizer(VQVAE(VQConfig(downsample=3, channels=[8, 8, 8], quantizer="rq", rq_depth=2,
                                  codebook_size=8, code_dim=4))).save(img)
    tok = ImageTokenizer.load(img)
    assert tok.size == 16 and tok.model.quantizer.codes().shape == (16, 4)
    t = tiny_tokenizers

    def config(mix: str, out: str, sampler: str = "auto"):
        return load_config(PretrainConfig, None, [
            "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=0",
            "trainer.warmup_steps=1", "data.val_batch_size=4", f"objectives.mix={mix}",
            "objectives.mix_start={}", "generate.captions=2", "generate.images=2",
            "generate.candidates=2", f"generate.sampler={sampler}"], **{
            "out": str(tmp_path / out),
            "data": {"train": [str(shapes_dir / "train-*.tar")],
                     "val": [str(shapes_dir / "test-novel-*.tar")]},
            "tokenizers": {"text": str(t / "text"), "image": str(img)},
            "model": {"trunk": {"dim": 32, "layers": 1, "heads": 2, "ffn_dim": 64},
                      "image_input": "pixels",
                      "image_encoder": {"channels": [8, 16, 32], "stem_channels": 8}}})

    mix = "{maskgit: 1, cm3: 1, mim: 1, mrc: 1, mrfr: 1, itc: 1}"
    with pytest.raises(ConfigError, match="generate.sampler=cm3 draws one image code"):
        Pretraining(config(mix, "refused", sampler="cm3"), progress=False)
    pre = Pretraining(config(mix, "run"), progress=False)
    assert pre.cfg.generate.sampler == "maskgit"  # auto: MaskGIT draws stacks
    assert pre.model.cfg.image_code_depth == 2 and pre.train.depth == 2
    assert torch.equal(pre.train.codes[:3], tok.encode(pre.train.pixels[:3]))
    lo, hi = pre.vocab.ranges()["image"]
    assert hi - lo == 16
    s = pre.fit()
    assert s["status"] == "done" and s["step"] == 2
    assert Path(s["samples"]["images_png"]).is_file() and len(s["samples"]["captions"]) == 2
    model = tmp_path / "model"
    assert main(["export", str(tmp_path / "run"), "--out", str(model), "-q"]) == 0
    out = tmp_path / "g.json"
    assert main(["eval", "generate", "--model", str(model), "--data",
                 str(shapes_dir / "test-novel-*.tar"), "--limit", "3", "--out", str(out),
                 "--set", "sampler=maskgit", "--set", "steps=2", "--set", "candidates=2",
                 "--set", "infill=objects", "-q"]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["images"] == 3 and 0 <= m["judge_color"] <= 1
    assert all(v > 0 for v in m["grounding"].values())
    assert main(["eval", "generate", "--model", str(model), "--data",
                 str(shapes_dir / "test-novel-*.tar"), "--limit", "3", "--out", str(out),
                 "--set", "sampler=cm3", "-q"]) == 2  # CM3 draws one code per position
    assert main(["eval", "generate", "--model", str(model), "--data",
                 str(shapes_dir / "test-novel-*.tar"), "--limit", "2", "--out", str(out),
                 "--set", "steps=2", "--set", "candidates=1", "-q"]) == 0
    assert json.loads(out.read_text())["metrics"]["settings"]["sampler"] == "maskgit"
