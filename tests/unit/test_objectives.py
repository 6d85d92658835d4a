"""Each pretraining objective's defining property, on a synthetic corpus (no shards)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from omnimask.fusion.packing import IGNORE
from omnimask.fusion.trunk import TrunkConfig
from omnimask.modalities.text.tokenizer import special_tokens
from omnimask.modalities.vocab import Vocab
from omnimask.model import ModelConfig, OmniModel
from omnimask.train.corpus import Corpus, patch_classes
from omnimask.train.objectives.base import (
    OBJECTIVES,
    Context,
    ObjectivesConfig,
    pretraining_heads,
)
from omnimask.train.objectives.cm3 import cm3_invert

TEXT, CODES, UNITS, P = 60, 32, 16, 16  # text vocab, VQ codes, speech units, patches (4x4)


def _vocab() -> Vocab:
    roles = list(special_tokens(16))
    return Vocab(text_size=TEXT, image_codes=CODES, speech_units=UNITS,
                 specials={r: i for i, r in enumerate(roles)})


def _corpus(n: int = 12, seed: int = 0) -> Corpus:
    g = torch.Generator().manual_seed(seed)
    nspec = len(special_tokens(16))
    caps = [[torch.randint(nspec, TEXT, (int(torch.randint(3, 9, (1,), generator=g)),),
                           generator=g).tolist() for _ in range(2)] for _ in range(n)]
    lat = F.normalize(torch.randn(n, P, 8, generator=g), dim=-1)
    lens = [int(torch.randint(6, 20, (1,), generator=g)) for _ in range(n)]
    return Corpus(keys=[f"s{i}" for i in range(n)], captions=caps, spoken=[1] * n,
                  codes=torch.randint(0, CODES, (n, P), generator=g), latents=lat.half(),
                  features=lat.half(), grid=(4, 4),
                  speech=[torch.randn(k, 12, generator=g).half() for k in lens],
                  units=[torch.randint(0, UNITS, (k,), generator=g) for k in lens])


def _ctx(**kw) -> Context:
    g = torch.Generator().manual_seed(1)
    return Context(vocab=_vocab(), codebook=F.normalize(torch.randn(CODES, 8, generator=g), dim=-1),
                   word_start=torch.rand(TEXT, generator=g) < 0.5, cfg=ObjectivesConfig(**kw))


def _model(ctx: Context, trunk: dict | None = None, **kw) -> OmniModel:
    """A tiny model with every pretraining head (``kw``: ModelConfig fields, ``trunk``:
    TrunkConfig ones; images as the corpus's feature rows unless ``image_input`` says
    otherwise)."""
    torch.manual_seed(0)
    kw = {"image_input": "vq_latents", **kw}
    return OmniModel(ModelConfig(
        trunk=TrunkConfig(vocab_size=ctx.vocab.size, dim=32, layers=2, heads=4, ffn_dim=64,
                          attention_backend="sdpa", **(trunk or {})),
        image_feature_dim=8, speech_feature_dim=12, image_codes=CODES, speech_units=UNITS,
        code_dim=8, **kw), pretraining_heads(ctx.cfg))


def _batch(name, ctx, corpus, seed=0, idx=None):
    g = torch.Generator().manual_seed(seed)
    return OBJECTIVES.create(name, ctx).batch(corpus, idx or list(range(8)), g)


def test_mlm_conditional_masking_text_only():
    ctx, c = _ctx(), _corpus()
    b = _batch("mlm", ctx, c)["packed"]
    tgt = b.targets != IGNORE
    assert tgt.any() and (b.modality[tgt] == 0).all()  # targets in text only
    assert not b.features["image"].isnan().any()
    for s, e in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist()):
        assert tgt[s:e].sum() >= 1  # at least one per example
    assert torch.equal(b.features["image"], c.features[:8].float().reshape(-1, 8))


@pytest.mark.parametrize("name", ["mrfr", "mrc", "mim"])
def test_region_objectives_mask_image_only(name):
    ctx, c = _ctx(), _corpus()
    b = _batch(name, ctx, c)
    p, m = b["packed"], b["masked"]["image"]
    assert (p.targets == IGNORE).all() and ctx.sp("mask") not in p.ids.tolist()
    per = m.view(8, P).sum(1)
    assert (per >= 1).all()
    if name == "mim":  # BEiT: code ids of the masked patches in the shared vocabulary
        want = torch.cat([c.codes[i][m.view(8, P)[i]] for i in range(8)]) + ctx.vocab.image_offset
        assert torch.equal(b["target"], want)


def test_mrfr_head_is_tied_to_the_image_projection_and_regresses_features():
    ctx, c = _ctx(), _corpus()
    model = _model(ctx)
    b = _batch("mrfr", ctx, c)
    out = OBJECTIVES.create("mrfr", ctx).loss(model, b)
    out["loss"].backward()
    proj, head = model.encoder.embedders["image"].proj, model.heads["mrfr"]
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert head.bias.grad is not None  # the loss reaches the head's own parameters
    h = torch.randn(3, 32)
    want = head.transform(h) @ proj.weight + head.bias
    torch.testing.assert_close(head.features(model.encoder, h), want)
    masked_feats = b["packed"].features["image"][b["masked"]["image"]]
    assert torch.equal(b["target"], masked_feats)


def test_mrc_kl_is_kl_target_to_model():
    ctx, c = _ctx(), _corpus()
    model = _model(ctx)
    b = _batch("mrc", ctx, c)
    t = b["target"]
    torch.testing.assert_close(t.sum(-1), torch.ones(len(t)))
    out = OBJECTIVES.create("mrc", ctx).loss(model, b)
    p, m = b["packed"], b["masked"]
    with torch.no_grad():
        h = model.encoder(p, masked=m)[p.feature_index["image"][m["image"]]]
        logp = model.heads["mrc"].logits(model.encoder, h).log_softmax(-1)
    want = (t * (t.log() - logp)).sum(-1).mean()  # KL(target || model), per region
    torch.testing.assert_close(out["mrc"], want, atol=1e-5, rtol=1e-5)
    # its minimum is the target itself: a model predicting the target has zero loss
    assert F.kl_div(t.log(), t, reduction="batchmean").abs() < 1e-6


def test_itm_negatives_are_other_images_and_loss_adds_wra():
    ctx, c = _ctx(), _corpus(n=40)
    obj = OBJECTIVES.create("itm", ctx)
    negs = 0
    for seed in range(20):
        b = obj.batch(c, list(range(40)), torch.Generator().manual_seed(seed))
        assert all(o != i for o, i in zip(b["other"], b["idx"]))
        negs += int(b["neg"].sum())
    assert 0.4 < negs / 800 < 0.6
    model = _model(ctx)
    out = obj.loss(model, b)
    torch.testing.assert_close(out["loss"].detach(), out["itm"] + 0.1 * out["wra"])
    assert ctx.sp("mask") not in obj._pairs(model, b)[0].ids.tolist()  # ITM masks nothing


def test_itm_hard_negatives_follow_itc_similarity():
    ctx, c = _ctx(itm_hard_negatives=True, itm_neg_prob=1.0), _corpus(n=10)
    obj = OBJECTIVES.create("itm", ctx)
    model = _model(ctx)
    b = obj.batch(c, list(range(10)), torch.Generator().manual_seed(0))
    hard = obj._hard(model, b)
    assert len(hard) == 10 and all(h != i for h, i in zip(hard, b["idx"]))


def test_itc_is_symmetric_info_nce():
    ctx, c = _ctx(), _corpus()
    model = _model(ctx)
    from omnimask.train.objectives.itc import embed_pairs, info_nce

    b = _batch("itc", ctx, c)
    t, v = embed_pairs(model, ctx, c, b["idx"], b["caps"])
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(8))
    scale = model.heads["itc"].logit_scale
    s = scale.exp() * t @ v.T
    want = (F.cross_entropy(s, torch.arange(8)) + F.cross_entropy(s.T, torch.arange(8))) / 2
    torch.testing.assert_close(info_nce(t, v, scale), want)
    out = OBJECTIVES.create("itc", ctx).loss(model, b)
    out["loss"].backward()
    assert scale.grad is not None  # the temperature is learned
    torch.testing.assert_close(out["temperature"], torch.tensor(0.07))


def test_cm3_documents_invert_and_never_predict_sentinels():
    ctx, c = _ctx(), _corpus()
    obj = OBJECTIVES.create("cm3", ctx)
    sent = obj.sentinels
    for seed in range(10):
        g1, g2 = (torch.Generator().manual_seed(seed) for _ in range(2))
        doc = obj.document(c, 3, g1)
        segs = obj.sample(c, 3, g2)
        ids = torch.cat([s.ids for s in segs]).tolist()
        tgt = torch.cat([s.targets for s in segs]).tolist()
        assert cm3_invert(ids, sent, ctx.sp("eos"), ctx.sp("eod")) == doc
        assert not set(tgt) & set(sent)  # zero weight on predicting sentinels
        assert any(t in sent for t in ids)
        # the caption is closed by <sep>, which no span moves: it precedes the moved spans
        sep, cap = ctx.sp("sep"), doc.index(ctx.sp("sep"))
        assert doc.count(sep) == 1
        assert any(doc[cap - len(ref):cap] == list(ref) for ref in c.captions[3])
        assert ids.index(sep) < len(ids) - ids[::-1].index(sent[0]) - 1
        # image tokens keep the (row, col) of where they were in the image
        lo = ctx.vocab.image_offset
        codes = (c.codes[3] + lo).tolist()
        for s in segs:
            if s.modality == "image":
                for tok, (r, col) in zip(s.ids.tolist(), s.rc.tolist()):
                    assert codes[r * 4 + col] == tok


def test_speech_targets_only_at_masked_frames():
    ctx, c = _ctx(speech_start_prob=0.1, speech_span=3), _corpus()
    obj = OBJECTIVES.create("speech", ctx)
    model = _model(ctx)
    b1 = obj.batch(c, list(range(8)), torch.Generator().manual_seed(0))
    m = b1["masked"]["speech"]
    assert m.any() and not m.all()
    # change every unit at unmasked frames: same targets, same loss (HuBERT's property)
    c2 = _corpus()
    off = 0
    for i in range(8):
        n = len(c2.units[i])
        keep = m[off:off + n]
        c2.units[i] = torch.where(keep, c2.units[i], (c2.units[i] + 1) % UNITS)
        off += n
    b2 = obj.batch(c2, list(range(8)), torch.Generator().manual_seed(0))
    assert torch.equal(b1["target"], b2["target"])
    torch.testing.assert_close(obj.loss(model, b1)["loss"], obj.loss(model, b2)["loss"])
    # HuBERT logits: cosine / 0.1
    h = torch.randn(5, 32)
    head = model.heads["speech"]
    want = F.cosine_similarity(head.proj(h)[:, None], head.embed[None], dim=-1) / 0.1
    torch.testing.assert_close(head.logits(h), want, atol=1e-5, rtol=1e-5)


def test_speech_crop_and_cross_modal_text():
    ctx, c = _ctx(speech_max_units=7, speech_with_text=1.0), _corpus()
    b = _batch("speech", ctx, c)
    p = b["packed"]
    n_speech = (p.modality == 2).view(-1)
    lens = [int(n_speech[s:e].sum()) for s, e in zip(p.cu_seqlens[:-1], p.cu_seqlens[1:])]
    assert max(lens) <= 7
    assert (p.modality == 0).sum() > 0  # the caption comes first in every sample
    assert all(int(p.modality[s]) == 0 for s in p.cu_seqlens[:-1].tolist())



@pytest.mark.parametrize("batchnorm", [True, False])
def test_itc_batchnorm_removes_the_shared_component(batchnorm):
    """With model.itc_batchnorm a component every sample's states share does not reach the
    ITC embeddings (training mode); in eval mode (running statistics) a sample embeds the
    same alone as in a batch. Without it the shared component does change them."""
    from omnimask.train.objectives.itc import embed_pairs

    ctx, c = _ctx(), _corpus()
    model = _model(ctx, itc_batchnorm=batchnorm)
    b = _batch("itc", ctx, c)
    t0, v0 = embed_pairs(model, ctx, c, b["idx"], b["caps"])
    encode = model.encoder.forward
    shift = 5 * torch.randn(model.cfg.trunk.dim)
    model.encoder.forward = lambda p, **kw: encode(p, **kw) + shift
    t1, v1 = embed_pairs(model, ctx, c, b["idx"], b["caps"])
    same = torch.allclose(t0, t1, atol=1e-5) and torch.allclose(v0, v1, atol=1e-5)
    assert same == batchnorm
    del model.encoder.forward
    if batchnorm:
        model.eval()
        t, v = embed_pairs(model, ctx, c, b["idx"], b["caps"])
        t2, v2 = embed_pairs(model, ctx, c, b["idx"][:1], b["caps"][:1])
        torch.testing.assert_close(t2[0], t[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(v2[0], v[0], atol=1e-5, rtol=0)

@pytest.mark.parametrize("name", ["mlm", "mrfr", "mrc", "mim", "itm", "itc", "cm3", "speech"])
def test_every_objective_learns_a_fixed_batch(name):
    ctx, c = _ctx(), _corpus()
    model = _model(ctx)
    obj = OBJECTIVES.create(name, ctx)
    b = obj.batch(c, list(range(8)), torch.Generator().manual_seed(0))
    first = fit_fixed_batch(lambda: obj.loss(model, b), model, name, steps=100, lr=1e-3)
    assert float(obj.loss(model, b)[name]) < 0.7 * first


def fit_fixed_batch(loss, model, key: str, steps: int, lr: float) -> float:
    """``steps`` AdamW steps on ``loss()`` (one fixed batch); returns the first ``key``."""
    opt = torch.optim.AdamW(model.parameters(), lr)
    first = None
    for _ in range(steps):
        out = loss()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else float(out[key])
    return first


def test_init_from_tokenizers_keeps_the_codebook_geometry():
    ctx = _ctx()
    model = _model(ctx)
    cents = torch.randn(UNITS, 12)
    model.init_from_tokenizers(ctx.codebook, ctx.vocab, True, cents, seed=0)
    lo, hi = ctx.vocab.ranges()["image"]
    e = model.encoder.trunk.tok.weight[lo:hi].detach()
    scale = (0.02 * 32 ** 0.5) ** 2
    torch.testing.assert_close(e @ e.T, ctx.codebook @ ctx.codebook.T * scale, atol=1e-5, rtol=1e-4)
    # the image input projection maps a latent onto its code's embedding direction
    z = ctx.codebook[:5]
    image = model.encoder.embedders["image"]
    torch.testing.assert_close(F.normalize(z @ image.proj.weight.T, dim=-1),
                               F.normalize(e[:5], dim=-1), atol=1e-5, rtol=1e-4)
    u = F.normalize(model.heads["speech"].embed.detach(), dim=-1)
    c = F.normalize(cents, dim=-1)
    assert torch.corrcoef(torch.stack([(u @ u.T).flatten(), (c @ c.T).flatten()]))[0, 1] > 0.5
    # MRC scores against the tokenizer's codebook: a latent's own code scores highest
    torch.testing.assert_close(image.codebook, F.normalize(ctx.codebook, dim=-1))


def test_speech_conv_never_mixes_two_utterances():
    ctx, c = _ctx(), _corpus()
    model = _model(ctx).eval()
    from omnimask.fusion.packing import Segment, pack

    a, b = c.speech[0].float(), c.speech[1].float()
    both = pack([[Segment("speech", features=a)], [Segment("speech", features=b)]])
    alone = pack([[Segment("speech", features=a)]])
    with torch.no_grad():
        fa = model.encoder.input_features(both)[: len(a)]
        torch.testing.assert_close(fa, model.encoder.input_features(alone))
        # and it does mix neighbours within one utterance: changing frame 3 moves frame 4
        a2 = a.clone()
        a2[3] += 5
        f2 = model.encoder.input_features(pack([[Segment("speech", features=a2)]]))
        assert not torch.allclose(f2[4], fa[4])


def test_image_codes_enter_like_their_latents():
    """image_code_input=features: a document of VQ code ids reaches the trunk exactly as the
    same image given as its code vectors (the path continuous latents take)."""

    from omnimask.fusion.packing import Segment, pack

    ctx, c = _ctx(), _corpus()
    enc = _model(ctx).eval().encoder
    lo = ctx.vocab.ranges()["image"][0]
    enc.cfg = replace(enc.cfg, image_code_offset=lo, image_code_input="features")
    enc.embedders["image"].codebook.copy_(ctx.codebook)
    assert enc.codes_as_features
    text = Segment("text", ids=torch.tensor(c.captions[0][0]))
    ids = pack([[text, Segment("image", ids=ctx.vocab.from_image(c.codes[0]), grid=c.grid)]])
    vec = pack([[text, Segment("image", features=ctx.codebook[c.codes[0]], grid=c.grid)]])
    with torch.no_grad():
        torch.testing.assert_close(enc(ids, mask="causal"), enc(vec, mask="causal"))
        enc.cfg = replace(enc.cfg, image_code_input="embedding")
        assert not enc.codes_as_features
        assert not torch.allclose(enc(ids), enc(vec))


def test_patch_classes_are_each_patch_pixel_fractions():
    g = torch.Generator().manual_seed(3)
    seg = torch.randint(0, 5, (3, 8, 8), generator=g, dtype=torch.uint8)
    got = patch_classes(seg, 2)  # 2x2 patches of 4x4 pixels, raster order
    assert got.shape == (3, 4, 5) and got.dtype == torch.float16
    for n in range(3):
        for r in range(2):
            for c in range(2):
                patch = seg[n, 4 * r:4 * r + 4, 4 * c:4 * c + 4].flatten().tolist()
                want = [patch.count(k) / 16 for k in range(5)]
                torch.testing.assert_close(got[n, 2 * r + c].float(), torch.tensor(want))
    with pytest.raises(Exception, match="3x3 patches"):
        patch_classes(seg, 3)



@pytest.mark.parametrize("multiway", [False, True])
@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_objective_steps_under_bf16_autocast(name, multiway):
    """CUDA's default precision is bf16 autocast: every objective's loss and gradients run
    under it (here on the CPU, the same dtype rules) and stay finite, and the loss is the
    fp32 loss to bf16's precision."""
    ctx, c = _ctx(), _corpus()
    model = _model(ctx, trunk={"multiway": multiway})
    obj = OBJECTIVES.create(name, ctx)
    b = obj.batch(c, list(range(8)), torch.Generator().manual_seed(0))
    bf16_step_matches_fp32(lambda: obj.loss(model, b), model)


def bf16_step_matches_fp32(loss, model) -> None:
    """``loss()`` (a loss dict) under CPU bf16 autocast: finite, within bf16's precision of
    the fp32 loss (both from the same seed), and finite gradients after its backward."""
    torch.manual_seed(1)
    with torch.no_grad():
        want = float(loss()["loss"])
    torch.manual_seed(1)
    with torch.autocast("cpu", torch.bfloat16):
        out = loss()["loss"]
    out.float().backward()
    got = float(out.detach())
    assert math.isfinite(got) and abs(got - want) < 0.05 * max(1.0, abs(want)), (got, want)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
