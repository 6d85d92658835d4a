"""Images from pixels (``model.image_input=pixels``): every objective trains the image
encoder, masked patches leak nothing, the model directory round-trips, reranking scores
pixels, and the input forms never mix."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import omnimask
from omnimask.errors import ConfigError, OmnimaskError
from omnimask.fusion.packing import Segment, pack
from omnimask.fusion.trunk import TrunkConfig
from omnimask.modalities.image.encoder import ImageEncoderConfig
from omnimask.model import ModelConfig
from omnimask.train.objectives import cm3_generate as cg
from omnimask.train.objectives.base import OBJECTIVES

from .test_objectives import P, _corpus, _ctx, _model

S, G = 16, 4  # image side, token grid (the synthetic corpus has 4x4 patches)
IMAGE_OBJECTIVES = ("mlm", "mrfr", "mrc", "mim", "itm", "itc")


def _enc() -> ImageEncoderConfig:
    return ImageEncoderConfig(image_size=S, grid=G, channels=[8, 16], stem_channels=4)


def _pixel_corpus(n: int = 12):
    c = _corpus(n)
    g = torch.Generator().manual_seed(5)
    c.pixels = torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=g)
    # features unlike the latents: MRFR from pixels must regress the latents
    c.features = torch.randn(c.features.shape, generator=g).half()
    return c


def _setup():
    ctx = _ctx()
    ctx.pixels = True
    return ctx, _pixel_corpus(), _model(ctx, image_input="pixels", image_encoder=_enc())


def _batch(name, ctx, corpus, seed=0):
    return OBJECTIVES.create(name, ctx).batch(corpus, list(range(8)),
                                              torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_objective_trains_from_pixels(name):
    ctx, c, model = _setup()
    b = _batch(name, ctx, c)
    out = OBJECTIVES.create(name, ctx).loss(model, b)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    enc = model.encoder.embedders["image"].encoder
    reached = [k for k, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    if name in IMAGE_OBJECTIVES:  # every encoder weight learns from the objective
        assert len(reached) == len(list(enc.parameters())), name
    else:  # CM3 reads VQ code ids, speech no image: the encoder is not run
        assert not reached
    p = b.get("packed")
    if p is not None and name in IMAGE_OBJECTIVES:
        assert "image" in p.pixels and "image" not in p.features
        assert p.pixels["image"].shape == (8, 3, S, S) and p.pixels["image"].dtype == torch.uint8


def test_mrfr_from_pixels_regresses_the_frozen_vq_latents():
    ctx, c, _ = _setup()
    b = _batch("mrfr", ctx, c)
    m = b["masked"]["image"].view(8, P)
    want = torch.cat([c.latents[i].float()[m[i]] for i in range(8)])
    assert torch.equal(b["target"], want)
    assert not torch.equal(b["target"], torch.cat([c.features[i].float()[m[i]] for i in range(8)]))


def _patch(k: int) -> tuple[slice, slice]:
    r, col, side = k // G, k % G, S // G
    return slice(r * side, (r + 1) * side), slice(col * side, (col + 1) * side)


@pytest.mark.parametrize("name", ["mrfr", "mim"])
def test_a_masked_patch_leaks_nothing(name):
    """Changing the pixels inside a masked patch changes no hidden state at all (the patch
    is blanked before the encoder, whose convolutions cross patches), in train mode
    (BatchNorm on batch statistics) too; changing an unmasked patch does change them."""
    ctx, c, model = _setup()
    b = _batch(name, ctx, c)
    p, masked = b["packed"], b["masked"]
    m0 = masked["image"].view(8, P)[0]
    hidden_patch = int(m0.nonzero()[0])
    seen_patch = int((~m0).nonzero()[0])
    model.train()
    with torch.no_grad():
        h = model.encoder(p, masked=masked)
        for patch, leaks in ((hidden_patch, False), (seen_patch, True)):
            px = p.pixels["image"].clone()
            rows, cols = _patch(patch)
            px[0, :, rows, cols] = 255 - px[0, :, rows, cols]
            h2 = model.encoder(replace(p, pixels={"image": px}), masked=masked)
            assert (not torch.equal(h, h2)) == leaks, (patch, leaks)
        # the masked positions read the mask embedding, whatever their pixels
        emb = model.encoder.embedders["image"]
        rows = emb.embed_pixels(p.pixels["image"], masked["image"])[masked["image"]]
        assert torch.equal(rows, emb.mask_embed.expand_as(rows))


def test_save_pretrained_round_trip_with_pixels(tmp_path):
    ctx, c, model = _setup()
    model.vocab = ctx.vocab
    b = _batch("itm", ctx, c)
    obj = OBJECTIVES.create("itm", ctx)
    model.train()
    with torch.no_grad():  # BatchNorm running statistics move away from their init
        obj.loss(model, b)
    model.eval()
    inputs = obj.inputs(model, b)
    with torch.no_grad():
        h, logits = model.encoder(inputs["packed"]), model(inputs, task="itm")["itm"]
    d = model.save_pretrained(tmp_path / "m")
    info = json.loads((d / "config.json").read_text())
    assert info["model"]["image_input"] == "pixels"
    assert info["model"]["image_encoder"] == {**_enc().__dict__, "dim": 32}
    loaded = omnimask.load(d).eval()
    assert loaded.cfg.image_input == "pixels" and loaded.cfg.image_encoder == model.cfg.image_encoder
    with torch.no_grad():
        assert torch.equal(loaded.encoder(inputs["packed"]), h)
        assert torch.equal(loaded(inputs, task="itm")["itm"], logits)


def test_reranking_scores_pixels_like_the_training_pairs():
    from omnimask.train.objectives.itc import embed_pairs

    ctx, c, model = _setup()
    model.eval()
    idx = [0, 3, 5]
    caps = [c.captions[i][0] for i in idx]
    t, v = embed_pairs(model, ctx, c, idx, caps)
    torch.testing.assert_close(cg.itc_scores(model, ctx, caps, c.pixels[idx]),
                               (v * t).sum(-1), atol=1e-5, rtol=1e-5)
    p = cg.itm_scores(model, ctx, caps, c.pixels[idx])
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()

    class VQ:  # the candidates' codes are decoded to pixels, not re-encoded to latents
        def decode(self, codes):
            return c.pixels[: len(codes)]

        def unit_latents(self, images):
            raise AssertionError("a pixels model scores pixels")

    tok = type("Tok", (), {"model": VQ()})()
    assert torch.equal(cg.rerank_features(tok, pixels=True)(c.codes[:2]), c.pixels[:2])


def test_input_forms_never_mix_and_fail_clearly():
    ctx, c, model = _setup()
    feats = pack([[Segment("image", features=c.features[0].float(), grid=(G, G))]])
    with pytest.raises(OmnimaskError, match="image features given to a model that reads pixels"):
        model.encoder(feats)
    px = pack([[Segment("image", pixels=c.pixels[0], grid=(G, G))]])
    with pytest.raises(OmnimaskError, match="image_input=pixels.*'vq_latents'"):
        _model(_ctx()).encoder(px)
    with pytest.raises(OmnimaskError, match="segment grid must be model.image_encoder.grid"):
        model.encoder(pack([[Segment("image", pixels=c.pixels[0], grid=(2, 2))]]))
    with pytest.raises(ValueError, match="both as features and as pixels"):
        pack([[Segment("image", pixels=c.pixels[0], grid=(G, G))],
              [Segment("image", features=c.features[0].float(), grid=(G, G))]])
    with pytest.raises(ValueError, match="exactly one"):
        Segment("image", features=c.features[0].float(), pixels=c.pixels[0], grid=(G, G))
    with pytest.raises(ValueError, match="needs its token grid"):
        Segment("image", pixels=c.pixels[0])
    with pytest.raises(ValueError, match="uint8"):
        Segment("image", pixels=c.pixels[0].float(), grid=(G, G))
    c.pixels = None
    with pytest.raises(OmnimaskError, match="corpus keeps no pixels"):
        _batch("itc", ctx, c)


def test_model_config_image_input_is_checked_and_the_encoder_follows_the_trunk():
    with pytest.raises(ConfigError, match="model.image_input must be pixels"):
        omnimask.create_model("omnimask-tiny", image_input="jpeg")
    cfg = ModelConfig(image_input="pixels", trunk=TrunkConfig(dim=64, heads=4))
    assert cfg.image_encoder.dim == 64
    assert omnimask.create_model("omnimask-tiny", **{"trunk.dim": 32}).cfg.image_encoder.dim == 32


def test_pretraining_refuses_features_the_model_does_not_read(tmp_path):
    from omnimask.train.pretrain import PretrainConfig, PretrainData, Pretraining

    for ii, feats in (("vq_latents", "patch_encoder"), ("pixels", "patch_encoder"),
                      ("patch_encoder", "vq")):
        cfg = PretrainConfig(out=str(tmp_path / "run"), data=PretrainData(features=feats),
                             model=ModelConfig(image_input=ii))
        with pytest.raises(ConfigError, match=f"model.image_input={ii} needs data.features"):
            Pretraining(cfg, progress=False)
        assert not (tmp_path / "run").exists()  # nothing written first
