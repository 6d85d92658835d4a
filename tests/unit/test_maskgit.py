"""MaskGIT drawing: the masked-codes objective's data side, the decoding schedule, and a
learning check (codes that a caption word decides are drawn from the caption alone)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from omnimask.fusion.packing import IGNORE, pack
from omnimask.train.evaluate_generate import GenerateEvalConfig, draw_codes
from omnimask.train.objectives import maskgit as mg
from omnimask.train.objectives.base import ObjectivesConfig, text_segment

from .test_objectives import CODES, P, _batch, _corpus, _ctx, _model


def test_samples_mask_every_ratio_and_target_exactly_the_masked_codes():
    ctx = _ctx(maskgit_uncond=0.25)
    corpus = _corpus()
    lo = ctx.vocab.ranges()["image"][0]
    obj = mg.MaskGIT(ctx)
    g = torch.Generator().manual_seed(0)
    counts, uncond = [], 0
    for k in range(400):
        i = k % len(corpus)
        text, image = obj.sample(corpus, i, g)
        assert text.ids[0] == ctx.sp("cls")
        uncond += len(text.ids) == 1
        masked = image.ids == ctx.sp("mask")
        codes = corpus.codes[i] + lo
        assert torch.equal(image.ids[~masked], codes[~masked])  # the rest is the image
        assert torch.equal(image.targets[masked], codes[masked])
        assert bool((image.targets[~masked] == IGNORE).all())
        rows, cols = corpus.grid
        assert torch.equal(image.rc[:, 0] * cols + image.rc[:, 1], torch.arange(P))
        counts.append(int(masked.sum()))
    # r = cos(pi/2 u): at least one masked, all of them sometimes; P(all) = 2/pi acos(15/16)
    assert min(counts) >= 1 and max(counts) == P
    assert abs(sum(c == P for c in counts) / 400 - 2 / math.pi * math.acos((P - 1) / P)) < 0.06
    assert abs(sum(counts) / 400 / P - 2 / math.pi) < 0.06  # E[cos(pi/2 u)] = 2/pi
    assert abs(uncond / 400 - 0.25) < 0.07
    b = _batch("maskgit", ctx, corpus)
    assert b["packed"].num_samples == 8



def _spy_rounds(monkeypatch, model, ctx) -> list:
    """What the model reads in each call: per sample, its image's (codes, masked) [P]."""
    seen, real = [], model.encoder.forward
    lo, mask = ctx.vocab.ranges()["image"][0], ctx.sp("mask")

    def spy(batch, *args, **kwargs):
        for e in batch.cu_seqlens[1:].tolist():
            ids = batch.ids[e - P:e]
            seen.append(((ids - lo).masked_fill(ids == mask, 0), ids == mask))
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(model.encoder, "forward", spy)
    return seen

def test_draw_keeps_codes_and_unmasks_on_the_cosine_schedule(monkeypatch):
    ctx = _ctx()
    model = _model(ctx).eval()
    caps = [[20, 21, 22], [30]]
    seen = _spy_rounds(monkeypatch, model, ctx)
    real = mg.masked_image_segment
    steps = 5
    out = mg.draw(model, ctx, caps, P, 4, steps=steps, guidance=2.0,
                  gen=torch.Generator().manual_seed(0))
    assert out.shape == (2, P) and bool(((out >= 0) & (out < CODES)).all())
    per_round = [seen[4 * t:4 * t + 4] for t in range(steps)]  # 2 captions + 2 unconditional
    for t, rnd in enumerate(per_round):
        still = math.floor(P * math.cos(math.pi / 2 * t / steps))  # masked as round t starts
        for _codes, masked in rnd:
            assert int(masked.sum()) == still
        if t:  # drawn codes stay as they were
            prev_codes, prev_masked = per_round[t - 1][0]
            codes, masked = rnd[0]
            assert bool((masked <= prev_masked).all())
            assert torch.equal(codes[~prev_masked], prev_codes[~prev_masked])
    # greedy with one round: the argmax of one forward over the all-masked image
    one = mg.draw(model, ctx, caps, P, 4, steps=1, temperature=0.0)
    lo, hi = ctx.vocab.ranges()["image"]
    p = pack([[text_segment(ctx, c), real(ctx, torch.zeros(P, dtype=torch.long),
                                          torch.ones(P, dtype=torch.bool), 4, False)]
              for c in caps])
    h = model.encoder(p, mask="bidirectional")
    pos = torch.cat([torch.arange(int(e) - P, int(e)) for e in p.cu_seqlens[1:]])
    want = model.encoder.vocab_logits(h, pos)[:, lo:hi].argmax(-1).view(2, P)
    assert torch.equal(one, want)


def test_draw_infills_on_each_images_own_schedule(monkeypatch):
    ctx = _ctx()
    model = _model(ctx).eval()
    caps = [[20, 21], [30]]
    start = torch.randint(CODES, (2, P), generator=torch.Generator().manual_seed(1))
    keep = torch.zeros(2, P, dtype=torch.bool)
    keep[0, :4] = True
    keep[1, 3:13] = True
    seen = _spy_rounds(monkeypatch, model, ctx)
    steps = 4
    out = mg.draw(model, ctx, caps, P, 4, steps=steps, gen=torch.Generator().manual_seed(0),
                  start=start, keep_known=keep)
    assert torch.equal(out[keep], start[keep])  # the given codes stay
    for t in range(steps):
        for k in range(2):
            m = P - int(keep[k].sum())
            masked = seen[2 * t + k][1]
            assert int(masked.sum()) == math.floor(m * math.cos(math.pi / 2 * t / steps))
            assert not bool(masked[keep[k]].any())
    with pytest.raises(ValueError, match="keep_known"):
        mg.draw(model, ctx, caps, P, 4, start=start)
    # eval generate's path: candidates per caption, each infilled around the same codes
    monkeypatch.undo()
    g = GenerateEvalConfig(sampler="maskgit", candidates=3, steps=2, infill="objects",
                           order="random")
    out = draw_codes(model, ctx, caps, P, 4, g, gen=torch.Generator().manual_seed(0),
                     given=(start, keep))
    assert out.shape == (2, P) and torch.equal(out[keep], start[keep])


def train_maskgit(model, ctx, corpus, steps: int):
    """``model`` trained on the maskgit objective (Adam 3e-3, batches of 8, seeded)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    obj = mg.MaskGIT(ctx)
    for _ in range(steps):
        idx = torch.randint(len(corpus), (8,), generator=g).tolist()
        loss = model(obj.batch(corpus, idx, g), task="maskgit")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_maskgit_learns_to_draw_what_the_caption_decides():
    torch.manual_seed(0)
    ctx = _ctx(maskgit_uncond=0.0)
    corpus = _corpus(n=16)
    words = [20 + k for k in range(4)]
    # the caption's one word decides the image: codes k, k+4, k+8, ... repeated
    caps = [[[words[i % 4]]] * 2 for i in range(16)]
    codes = torch.stack([(torch.arange(P) * 4 + i % 4) % CODES for i in range(16)])
    corpus = replace(corpus, captions=caps, codes=codes)
    model = train_maskgit(_model(ctx), ctx, corpus, 250)
    drawn = mg.draw(model, ctx, [[w] for w in words], P, 4, steps=4, temperature=0.0)
    acc = float((drawn == codes[:4]).float().mean())
    assert acc > 0.9, acc
    # infilling: half of each image given, the rest drawn from the caption and those codes
    keep = torch.rand(4, P, generator=torch.Generator().manual_seed(2)) < 0.5
    filled = mg.draw(model, ctx, [[w] for w in words], P, 4, steps=2, temperature=0.0,
                     start=codes[:4], keep_known=keep)
    assert float((filled[~keep] == codes[:4][~keep]).float().mean()) > 0.9
    # grounding: the codes cost far less after their own caption than after another's
    # (the next sample's caption names the next word); object codes: their share of the loss
    with_objects, obj = _with_objects(corpus)
    gr = mg.grounding(model, ctx, with_objects, list(range(8)))
    assert gr["codes_given_caption"] < gr["codes_given_other_caption"] - 1.0, gr
    p = pack([[text_segment(ctx, corpus.captions[i][0]), mg.masked_image_segment(
        ctx, codes[i], torch.ones(P, dtype=torch.bool), 4)] for i in range(8)])
    with torch.no_grad():
        h = model.encoder(p, mask="bidirectional")
        pos = p.target_positions
        ce = F.cross_entropy(model.encoder.vocab_logits(h, pos), p.targets[pos],
                             reduction="none")
    assert abs(gr["codes_given_caption"] - float(ce.mean())) < 1e-3
    assert abs(gr["object_codes_given_caption"] - float(ce[obj[:8].flatten()].mean())) < 1e-3


def _with_objects(corpus, seed: int = 3):
    """The corpus with ``regions``: each patch background (class 0) or, for about a third,
    partly an object (class 1 or 2)."""
    g = torch.Generator().manual_seed(seed)
    n = len(corpus)
    obj = torch.rand(n, P, generator=g) < 0.33
    share = torch.where(obj, torch.rand(n, P, generator=g) * 0.9 + 0.1, torch.zeros(n, P))
    cls = torch.randint(1, 3, (n, P), generator=g)
    regions = torch.zeros(n, P, 3)
    regions[..., 0] = 1 - share
    regions.scatter_(2, cls[..., None], share[..., None])
    return replace(corpus, regions=regions.half()), obj


def test_object_mask_masks_every_object_code_and_leaves_the_default_draws_alone():
    corpus, obj = _with_objects(_corpus())
    always, never = mg.MaskGIT(_ctx(maskgit_object_mask=1.0)), mg.MaskGIT(_ctx())
    g = torch.Generator().manual_seed(0)
    for k in range(40):
        i = k % len(corpus)
        image = always.sample(corpus, i, g)[1]
        masked = image.ids == always.ctx.sp("mask")
        assert bool(masked[obj[i]].all())
        assert torch.equal(image.targets != IGNORE, masked)
    # share 0 draws nothing more: the same samples as before the option existed
    a = never.batch(corpus, list(range(8)), torch.Generator().manual_seed(5))["packed"]
    b = _batch("maskgit", _ctx(), _corpus(), seed=5)["packed"]
    assert torch.equal(a.ids, b.ids) and torch.equal(a.targets, b.targets)
    # share 0.5: about half the samples have every object code masked
    half = mg.MaskGIT(_ctx(maskgit_object_mask=0.5, maskgit_uncond=0.0))
    full = 0
    for k in range(400):
        i = k % len(corpus)
        masked = half.sample(corpus, i, g)[1].ids == half.ctx.sp("mask")
        full += bool(masked[obj[i]].all())
    # all-masked by the ratio alone: P(r*P covers them) is small but not zero
    assert 0.45 < full / 400 < 0.7, full


def test_object_mask_of_boxes_masks_each_object_box_and_checks_the_region():
    corpus, obj = _with_objects(_corpus())
    boxes = mg.MaskGIT(_ctx(maskgit_object_mask=1.0, maskgit_object_mask_region="boxes"))
    want = mg.object_boxes(corpus, list(range(len(corpus))))
    g = torch.Generator().manual_seed(0)
    for k in range(40):
        i = k % len(corpus)
        masked = boxes.sample(corpus, i, g)[1].ids == boxes.ctx.sp("mask")
        assert bool(masked[want[i]].all()) and bool(masked[obj[i]].all())
    assert bool((want & ~obj).any())  # the boxes hold background codes: not the outline
    with pytest.raises(ValueError, match="objectives.maskgit_object_mask_region"):
        ObjectivesConfig(maskgit_object_mask_region="outline")


def test_object_weight_is_the_weighted_mean_of_the_masked_codes_cross_entropy():
    corpus, obj = _with_objects(_corpus())
    ctx = _ctx(maskgit_object_weight=4.0)
    b = _batch("maskgit", ctx, corpus, seed=2)
    model = _model(ctx).eval()
    p = b["packed"]
    pos = p.target_positions
    # brute force: each target's code, object or not, from its sample and patch
    want_w = []
    for s in range(p.num_samples):
        lo, hi = int(p.cu_seqlens[s]), int(p.cu_seqlens[s + 1])
        patch = torch.arange(P)
        img = hi - P
        for t in pos[(pos >= lo) & (pos < hi)].tolist():
            want_w.append(4.0 if obj[s][patch[t - img]] else 1.0)
    assert torch.equal(b["weights"], torch.tensor(want_w))
    h = model.encoder(p, mask="bidirectional")
    ce = F.cross_entropy(model.encoder.vocab_logits(h, pos).float(), p.targets[pos],
                         reduction="none")
    want = (ce * b["weights"]).sum() / b["weights"].sum()
    got = model(b, task="maskgit")["loss"]
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert {1.0, 4.0} <= set(want_w)  # both kinds of code are in the batch


def test_object_options_need_segmentation_maps():
    import pytest

    from omnimask.errors import OmnimaskError

    with pytest.raises(OmnimaskError, match="maskgit_object_weight"):
        _batch("maskgit", _ctx(maskgit_object_weight=2.0), _corpus())


def test_object_boxes_cover_each_object_group_with_a_margin():
    corpus, _ = _with_objects(_corpus(n=4))
    # sample 0: two separate objects on the 4 x 4 grid, sample 1: none, sample 2: a diagonal
    # pair (8-connected: one group)
    obj = torch.zeros(4, P, dtype=torch.bool)
    obj[0, [0, 15]] = True
    obj[2, [5, 10]] = True
    regions = torch.zeros(4, P, 3)
    regions[..., 0] = 1.0
    regions[..., 1] = obj.float()
    corpus = replace(corpus, regions=regions.half())

    def brute(o: torch.Tensor, margin: int) -> torch.Tensor:
        """Grow each connected group's box by flood fill over 8 neighbours, one by one."""
        o, seen, box = o.view(4, 4), set(), torch.zeros(4, 4, dtype=torch.bool)
        for r0 in range(4):
            for c0 in range(4):
                if not o[r0, c0] or (r0, c0) in seen:
                    continue
                group, todo = [], [(r0, c0)]
                while todo:
                    r, c = todo.pop()
                    if (r, c) in seen or not (0 <= r < 4 and 0 <= c < 4) or not o[r, c]:
                        continue
                    seen.add((r, c))
                    group.append((r, c))
                    todo += [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
                rs, cs = [r for r, _ in group], [c for _, c in group]
                for r in range(max(0, min(rs) - margin), min(4, max(rs) + margin + 1)):
                    for c in range(max(0, min(cs) - margin), min(4, max(cs) + margin + 1)):
                        box[r, c] = True
        return box.flatten()

    for margin in (0, 1):
        got = mg.object_boxes(corpus, [0, 1, 2], margin)
        for j in range(3):
            assert torch.equal(got[j], brute(obj[j], margin)), (j, margin)
    assert int(mg.object_boxes(corpus, [0], 0).sum()) == 2  # two single-code boxes
    assert int(mg.object_boxes(corpus, [2], 0).sum()) == 4  # one 2 x 2 box
    from omnimask.errors import OmnimaskError

    with pytest.raises(OmnimaskError, match="infill=objects: the shards have no seg.png"):
        mg.object_boxes(_corpus(n=2), [0])
