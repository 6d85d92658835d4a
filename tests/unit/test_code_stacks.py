"""An rq tokenizer's id stacks in every image-code objective: MaskGIT's stacked input, its
level-by-level loss against a hand-written chain, its data side and a learning check that
draws stacks whose second level depends on the first; CM3's documents of one stack token
per position (cached decoding against full sequences); MIM's and MRC's first level."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from omnimask.errors import OmnimaskError
from omnimask.fusion.packing import IGNORE, pack
from omnimask.train.objectives import cm3_generate as cg
from omnimask.train.objectives import cm3_lm
from omnimask.train.objectives import maskgit as mg
from omnimask.train.objectives.base import OBJECTIVES, text_segment

from .test_maskgit import train_maskgit
from .test_objectives import CODES, P, _batch, _corpus, _ctx, _model

DEPTH = 2
K = CODES // DEPTH  # codes per level


def _stacked(n: int = 12, seed: int = 0):
    """A corpus of id stacks [n, P * DEPTH] (each level's own ids in [0, K))."""
    c = _corpus(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return replace(c, codes=torch.randint(0, K, (n, P * DEPTH), generator=g))


def _ctx2(**kw):
    """A context whose image codes are stacks of ``DEPTH`` levels."""
    return replace(_ctx(**kw), depth=DEPTH)


def _stack_model(ctx):
    return _model(ctx, image_code_depth=DEPTH)


def test_stack_ids_put_each_level_in_its_own_rows():
    ctx = _ctx2()
    lo = ctx.vocab.ranges()["image"][0]
    codes = torch.tensor([[3, 5, 0, 15]])  # two positions, two levels each
    assert mg.stack_ids(ctx, codes).tolist() == [[[lo + 3, lo + K + 5], [lo, lo + K + 15]]]


def test_a_stack_enters_as_the_sum_of_its_levels_embeddings():
    ctx = _ctx2()
    model = _stack_model(ctx).eval()
    corpus = _stacked()
    seg = mg.masked_image_segment(ctx, corpus.codes[0], torch.zeros(P, dtype=torch.bool), 4)
    p = pack([[text_segment(ctx, [20, 21]), seg]])
    stacks = mg.stack_ids(ctx, corpus.codes[:1])
    with torch.no_grad():
        got = model.encoder(p, stack=mg.image_stacks(p, stacks))
        # by hand: the image positions as feature rows holding the summed embeddings
        tok = model.encoder.trunk.tok.weight
        feats = torch.zeros(p.num_tokens, tok.shape[1])
        feats[-P:] = tok[stacks[0]].sum(1)
        ids = p.ids.clone()
        ids[-P:] = -1
        want = model.encoder.trunk(replace(p, ids=ids), "bidirectional", features=feats)
        # only the first level: a different input
        first = model.encoder(p)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got[-P:], first[-P:], atol=1e-3)


def test_samples_feed_the_known_stacks_and_target_every_level_of_the_masked_ones():
    ctx = _ctx2(maskgit_uncond=0.0)
    corpus = _stacked()
    b = mg.MaskGIT(ctx).batch(corpus, list(range(6)), torch.Generator().manual_seed(0))
    p, stack = b["packed"], b["stack"]
    lo, hi = ctx.vocab.ranges()["image"]
    assert b["image_rows"] == (lo, K) and stack.shape == (p.num_tokens, DEPTH)
    want = mg.stack_ids(ctx, corpus.codes[:6])
    targets = []
    for j, e in enumerate(p.cu_seqlens[1:].tolist()):
        ids, st, tg = p.ids[e - P:e], stack[e - P:e], p.targets[e - P:e]
        masked = ids == ctx.sp("mask")
        assert masked.any()
        assert torch.equal(st[~masked], want[j][~masked])  # known stacks enter whole
        assert bool((st[masked] == -1).all())
        assert torch.equal(tg[masked], want[j][masked][:, 0])  # targets mark the masked
        assert bool((tg[~masked] == IGNORE).all())
        targets.append(want[j][masked])
        assert bool((stack[p.cu_seqlens[j]:e - P] == -1).all())  # the caption has no stack
    assert torch.equal(b["stack_targets"], torch.cat(targets))


def test_stack_loss_is_the_chain_of_level_cross_entropies():
    ctx = _ctx2(maskgit_uncond=0.0)
    model = _stack_model(ctx)
    corpus = _stacked()
    b = mg.MaskGIT(ctx).batch(corpus, list(range(6)), torch.Generator().manual_seed(1))
    loss = model(b, task="maskgit")["loss"]
    # by hand: level 0 from the hidden state, level 1 from it plus the map of level 0's
    # embedding, each a softmax over its own K rows
    head, enc = model.heads["maskgit"], model.encoder
    p = b["packed"]
    pos = p.target_positions
    h = enc(p, stack=b["stack"])[pos]
    tgt = b["stack_targets"]
    lo = ctx.vocab.ranges()["image"][0]
    lp0 = enc.vocab_logits(h, torch.arange(len(h)))[:, lo:lo + K].log_softmax(-1)

    def level1(t):  # log-probabilities of level 1 given level 0's ids t [n]
        x1 = h + head.levels[0](head.norm(enc.trunk.tok(t)))
        return enc.vocab_logits(x1, torch.arange(len(h)))[:, lo + K:lo + 2 * K].log_softmax(-1)

    nll = -torch.cat([lp0.gather(1, tgt[:, :1] - lo),
                      level1(tgt[:, 0]).gather(1, tgt[:, 1:] - lo - K)], 1)  # [n, levels]
    assert torch.allclose(loss, nll.sum(1).mean(), atol=1e-5)
    out = model(b, task="maskgit")  # each level's mean is logged beside the loss
    assert torch.allclose(torch.stack([out["maskgit_level0"], out["maskgit_level1"]]),
                          nll.mean(0), atol=1e-5)
    # level 1 reads level 0: another first level gives other level-1 probabilities
    other = lo + (tgt[:, 0] - lo + 1) % K
    assert (level1(other) - level1(tgt[:, 0])).abs().max() > 1e-3
    # object weights: the weighted mean of the stacks' NLL
    w = torch.rand(len(tgt), generator=torch.Generator().manual_seed(2)) + 0.5
    wl = model(dict(b, weights=w), task="maskgit")["loss"]
    assert torch.allclose(wl, (nll.sum(1) * w).sum() / w.sum(), atol=1e-5)


def test_maskgit_learns_to_draw_stacks_whose_levels_depend_on_each_other():
    torch.manual_seed(0)
    ctx = _ctx2(maskgit_uncond=0.0)
    words = [20 + k for k in range(4)]
    # the caption's word decides the first level up to a coin per position (+0 or +8); the
    # second level is a function of the first, so it must read the level drawn before it
    base = torch.stack([(torch.arange(P) * 3 + i % 4) % 8 for i in range(16)])
    first = base + 8 * torch.randint(0, 2, (16, P), generator=torch.Generator().manual_seed(5))
    second = (first * 5 + 7) % K
    codes = torch.stack([first, second], -1).reshape(16, -1)
    corpus = replace(_stacked(16), captions=[[[words[i % 4]]] * 2 for i in range(16)],
                     codes=codes)
    model = train_maskgit(_stack_model(ctx), ctx, corpus, 300)

    def follows(d):  # share of the drawn stacks [n, P, 2] whose levels agree
        return float((d[..., 1] == (d[..., 0] * 5 + 7) % K).float().mean())

    drawn = mg.draw(model, ctx, [[w] for w in words], P, 4, steps=4, temperature=0.0)
    assert drawn.shape == (4, P * DEPTH)
    drawn = drawn.view(4, P, DEPTH)
    assert float((drawn[..., 0] % 8 == base[:4]).float().mean()) > 0.9 and follows(drawn) > 0.9
    # sampled at temperature 1 with guidance: each coin drawn, the second level follows it
    s = mg.draw(model, ctx, [[w] for w in words] * 4, P, 4, steps=4, guidance=2.0,
                gen=torch.Generator().manual_seed(3)).view(16, P, DEPTH)
    assert 0.2 < float((s[..., 0] >= 8).float().mean()) < 0.8
    assert follows(s) > 0.9
    # infilling keeps the given stacks whole and draws the rest
    keep = torch.rand(4, P, generator=torch.Generator().manual_seed(2)) < 0.5
    filled = mg.draw(model, ctx, [[w] for w in words], P, 4, steps=2, temperature=0.0,
                     start=codes[:4], keep_known=keep).view(4, P, DEPTH)
    assert torch.equal(filled[keep], codes[:4].view(4, P, DEPTH)[keep])
    assert float((filled[..., 0] % 8 == base[:4]).float().mean()) > 0.9 and follows(filled) > 0.9
    # grounding: per code, far cheaper after the own caption than after another's
    gr = mg.grounding(model, ctx, corpus, list(range(8)))
    assert gr["codes_given_caption"] < gr["codes_given_other_caption"] - 1.0, gr
    with pytest.raises(ValueError, match=r"must be \[4, 32\] and \[4, 16\]"):
        mg.draw(model, ctx, [[w] for w in words], P, 4, start=codes[:4, :P], keep_known=keep)


def test_depth_one_heads_have_no_level_parameters():
    model = _model(_ctx())
    assert not list(model.heads["maskgit"].parameters())


def test_cm3_documents_hold_one_stack_token_per_position():
    ctx, corpus = _ctx2(), _stacked()
    lo = ctx.vocab.ranges()["image"][0]
    stacks = mg.stack_ids(ctx, corpus.codes[0])  # [P, DEPTH] vocabulary ids
    part = cg.image_part(ctx, corpus.codes[0])
    assert len(part) == P + 2 and min(part[1:-1]) >= ctx.vocab.size
    assert torch.equal(cm3_lm.doc_stacks(ctx, [part])[1:-1], stacks)  # the tokens' stacks
    segs = cm3_lm.doc_segments(ctx, part, cg.grid_indices(ctx, part), 4, targets=part)
    image = [s for s in segs if s.modality == "image"][0]
    assert torch.equal(image.ids, stacks[:, 0]) and torch.equal(image.targets, stacks[:, 0])
    obj = OBJECTIVES.create("cm3", ctx)
    b = obj.batch(corpus, list(range(6)), torch.Generator().manual_seed(0))
    p, stack = b["packed"], b["stack"]
    on = stack[:, 0] >= 0
    assert int(on.sum()) == 6 * P  # every position once, spans moved or not
    assert torch.equal(p.ids[on], stack[on, 0])  # it reads the first level's id there
    t = p.targets[p.targets != IGNORE]
    img = (t >= lo) & (t < lo + CODES)
    assert img.any() and bool((t[img] < lo + K).all())  # image targets: a first level
    for k, e in enumerate(p.cu_seqlens[1:].tolist()):  # each stack at its own position
        s = p.cu_seqlens[k]
        rows = on[s:e].nonzero()[:, 0] + s
        rc = p.position_2d[rows]
        want = mg.stack_ids(ctx, corpus.codes[k])[rc[:, 0] * 4 + rc[:, 1]]
        assert torch.equal(stack[rows], want)
    # the stacks are what the trunk reads: the loss differs from first levels alone
    model = _model(ctx, image_code_depth=DEPTH)
    with_stacks = model(b, task="cm3")["loss"]
    first_only = model({"packed": p}, task="cm3")["loss"]
    assert with_stacks.isfinite() and abs(float((with_stacks - first_only).detach())) > 1e-4


def test_cm3_captions_images_of_stacks_the_same_with_and_without_the_cache():
    ctx = _ctx2()
    model = _model(ctx, image_code_depth=DEPTH).eval()
    corpus = _stacked()
    b, im = ctx.sp("bos"), ctx.sp("image")
    seqs = [[b, *cg.image_part(ctx, corpus.codes[0]), 20], [b, 20, 31, ctx.sp("sep"), im],
            [b, *cg.image_part(ctx, corpus.codes[1])]]
    dec = cg.CachedDecoder(model, ctx, seqs, 4)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        assert torch.allclose(dec.logits, cg.next_logits(model, ctx, seqs, 4), atol=1e-5)
        new = [20 + int(torch.randint(30, (1,), generator=g)) for _ in seqs]
        for s, t in zip(seqs, new):
            s.append(t)
        dec.advance(new)
    # the stacks reach the trunk: another deeper level changes the next-token logits
    other = corpus.codes[0].clone()
    other[1::DEPTH] = (other[1::DEPTH] + 1) % K
    a = cg.next_logits(model, ctx, [[b, *cg.image_part(ctx, corpus.codes[0])]], 4)
    c = cg.next_logits(model, ctx, [[b, *cg.image_part(ctx, other)]], 4)
    assert not torch.allclose(a, c, atol=1e-4)
    with pytest.raises(OmnimaskError, match="sampler=maskgit"):
        cg.images_from_captions(model, ctx, [[20]], P, 4)


def test_mim_predicts_the_first_level_and_mrc_scores_the_first_levels_codes():
    ctx, corpus = _ctx2(), _stacked()
    lo = ctx.vocab.ranges()["image"][0]
    b = _batch("mim", ctx, corpus)
    m = b["masked"]["image"].view(8, P)
    first = corpus.codes[:8].view(8, P, DEPTH)[..., 0]
    assert torch.equal(b["target"], first[m] + lo)
    c = _batch("mrc", ctx, corpus)
    z = corpus.latents[:8].float()[c["masked"]["image"].view(8, P)]
    codes = F.normalize(ctx.codebook[:K], dim=-1)
    assert c["target"].shape == (len(z), K)
    assert torch.allclose(c["target"], (z @ codes.T / 0.1).softmax(-1), atol=1e-6)
    model = _model(ctx, image_code_depth=DEPTH)
    out = model(c, task="mrc")
    assert out["loss"].isfinite() and model.heads["mrc"].codes == K
