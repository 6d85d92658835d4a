"""CM3 generation: batched decoding equals decoding each prompt alone, classifier-free
guidance's limits, the n-gram ban, top-k, and reranking by the model's own heads."""

from __future__ import annotations

import torch

from omnimask.modalities.text.tokenizer import special_tokens
from omnimask.train.objectives import cm3_generate as cg
from omnimask.train.objectives.itc import embed_pairs

from .test_objectives import CODES, P, _corpus, _ctx, _model

TEXT_IDS = [20, 21, 22, 23, 24, 25]


class Tok:  # text ids decode to themselves; specials are the vocabulary's specials
    def __init__(self, ctx):
        self.text_size = ctx.vocab.text_size

    def is_special(self, t):
        return t < len(special_tokens(16)) or t >= self.text_size

    def decode(self, ids):
        return " ".join(map(str, ids))


def _setup():
    ctx = _ctx()
    model = _model(ctx).eval()
    allowed = torch.zeros(ctx.vocab.size, dtype=torch.bool)
    allowed[16:60] = True  # plain text tokens
    return ctx, model, allowed


def _prompts(ctx):
    b = ctx.sp("bos")
    return [[b, 20, 31], [b, 40, 41, 42, 43, 44], [b, 33]]


def test_batched_greedy_equals_each_prompt_alone():
    ctx, model, allowed = _setup()
    prompts = _prompts(ctx)
    together = cg.generate(model, ctx, prompts, 12, allowed)
    alone = [cg.generate(model, ctx, [p], 12, allowed)[0] for p in prompts]
    assert together == alone and all(len(o) == 12 for o in together)
    # the same as an explicit argmax over full-sequence causal logits
    seq = list(prompts[1])
    for t in together[1][:4]:
        assert int(cg.next_logits(model, ctx, [seq], 4)[0].masked_fill(~allowed, -1e9)
                   .argmax()) == t
        seq.append(t)


def test_stop_ends_one_sequence_only():
    ctx, model, allowed = _setup()
    prompts = _prompts(ctx)
    free = cg.generate(model, ctx, prompts, 10, allowed)
    stop = {free[0][2]}  # the third token of the first sequence
    outs = cg.generate(model, ctx, prompts, 10, allowed, stop=stop)
    for o, f in zip(outs, free):
        cut = next((k + 1 for k, t in enumerate(f) if t in stop), len(f))
        assert o == f[:cut]
    assert len(outs[0]) == 3


def test_guidance_limits():
    ctx, model, allowed = _setup()
    prompts, b = _prompts(ctx), ctx.sp("bos")
    uncond = [[b, 50]] * 3
    plain = cg.generate(model, ctx, prompts, 8, allowed)
    assert cg.generate(model, ctx, prompts, 8, allowed, uncond=uncond, guidance=1.0) == plain
    # s = 0 leaves only the unconditional logits: the unconditional prompt's own output
    only_u = cg.generate(model, ctx, prompts, 8, allowed, uncond=uncond, guidance=0.0)
    assert only_u == cg.generate(model, ctx, uncond, 8, allowed)
    # s = 3 is u + 3 (c - u) on log-probabilities: the first token checks the formula
    c = cg.next_logits(model, ctx, prompts, 4).log_softmax(-1)
    u = cg.next_logits(model, ctx, uncond, 4).log_softmax(-1)
    want = (u + 3 * (c - u)).masked_fill(~allowed, float("-inf")).argmax(-1).tolist()
    got = cg.generate(model, ctx, prompts, 1, allowed, uncond=uncond, guidance=3.0)
    assert [o[0] for o in got] == want


def test_no_repeat_ngram_and_top1_sampling():
    ctx, model, allowed = _setup()
    narrow = torch.zeros_like(allowed)
    narrow[20:24] = True  # 4 tokens: a long greedy run must repeat without the ban
    out = cg.generate(model, ctx, [[ctx.sp("bos")]], 14, narrow, no_repeat_ngram=2)[0]
    pairs = list(zip(out, out[1:]))
    assert len(pairs) == len(set(pairs))
    g = torch.Generator().manual_seed(0)
    prompts = _prompts(ctx)
    sampled = cg.generate(model, ctx, prompts, 6, allowed, temperature=0.7, top_k=1, gen=g)
    assert sampled == cg.generate(model, ctx, prompts, 6, allowed)


def test_no_repeat_ngram_bans_exactly_the_completing_tokens():
    assert cg.banned_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert cg.banned_tokens([1, 2, 1, 4, 1], 2) == {2, 4}
    assert cg.banned_tokens([5, 6], 3) == set()
    assert cg.banned_tokens([7, 7, 7], 1) == {7}


def test_images_from_captions_keeps_the_best_scored_candidate():
    ctx, model, _ = _setup()
    seen = []

    def score(caption, codes):
        seen.append(codes.clone())
        return -(codes - 5).abs().float().sum(1)  # prefers codes near 5

    g = torch.Generator().manual_seed(0)
    out = cg.images_from_captions(model, ctx, [TEXT_IDS, TEXT_IDS[:3]], P, 4, top_k=8,
                                  candidates=4, score=score, gen=g)
    assert out.shape == (2, P) and ((out >= 0) & (out < CODES)).all()
    for k in range(2):
        assert seen[k].shape == (4, P)
        assert torch.equal(out[k], seen[k][score(None, seen[k]).argmax()])
    assert len({tuple(c.tolist()) for c in seen[0]}) > 1  # sampled, not four copies


def test_caption_rerank_keeps_greedy_among_candidates_and_the_best_scored():
    ctx, model, _ = _setup()
    corpus = _corpus()

    codes = corpus.codes[:2]
    greedy = cg.caption_images(model, ctx, Tok(ctx), codes, max_new=6)
    seen = []

    def score(caps, i):
        seen.append((i, caps))
        return torch.tensor([float(sum(c)) for c in caps])  # prefers large ids

    out = cg.caption_images(model, ctx, Tok(ctx), codes, max_new=6, candidates=5,
                            temperature=1.5, score=score, gen=torch.Generator().manual_seed(0))
    assert [i for i, _ in seen] == [0, 1]
    for k, (_, caps) in enumerate(seen):
        assert len(caps) == 5 and " ".join(map(str, caps[0])) == greedy[k]  # greedy is one
        assert len({tuple(c) for c in caps}) > 1
        assert out[k] == " ".join(map(str, max(caps, key=sum)))
    # without a scorer, or with one candidate, the caption is the greedy one
    assert cg.caption_images(model, ctx, Tok(ctx), codes, max_new=6, candidates=5) == greedy

def test_rerank_scores_match_the_training_heads():
    ctx, model, _ = _setup()
    corpus = _corpus()
    idx = [0, 3, 5]
    cap = corpus.captions[0][0]
    t, v = embed_pairs(model, ctx, corpus, idx, [cap] * 3)
    torch.testing.assert_close(cg.itc_scores(model, ctx, [cap] * 3, corpus.features[idx]),
                               (v @ t[0]).detach(), atol=1e-5, rtol=1e-5)
    # pairwise: caption k against image k
    caps = [corpus.captions[i][0] for i in idx]
    t, v = embed_pairs(model, ctx, corpus, idx, caps)
    torch.testing.assert_close(cg.itc_scores(model, ctx, caps, corpus.features[idx]),
                               (v * t).sum(-1).detach(), atol=1e-5, rtol=1e-5)
    p = cg.itm_scores(model, ctx, [cap] * 3, corpus.features[idx])
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()
    from omnimask.fusion.packing import pack
    from omnimask.train.objectives.base import image_segment, text_segment

    with torch.no_grad():
        for k, i in enumerate(idx):
            b = pack([[text_segment(ctx, cap), image_segment(corpus, i)]])
            h = model.encoder(b)
            want = model.heads["itm"].logits(model.encoder, h, b).softmax(-1)[0, 1]
            assert abs(float(want) - float(p[k])) < 1e-5


def test_grounding_pairs_differ_only_in_the_other_modality():
    ctx, model, _ = _setup()
    corpus = _corpus()
    g = cg.grounding(model, ctx, corpus, [0, 1, 2, 3])
    assert set(g) == {"image_given_caption", "image_given_other_caption", "caption_given_image",
                      "caption_given_other_image"} and all(v > 0 for v in g.values())
    assert g["image_given_caption"] != g["image_given_other_caption"]
    # every sample with the same caption and image: rotating changes nothing
    for i in range(1, 4):
        corpus.captions[i] = corpus.captions[0]
        corpus.codes[i] = corpus.codes[0]
    same = cg.grounding(model, ctx, corpus, [0, 1, 2, 3])
    assert same["image_given_caption"] == same["image_given_other_caption"]
    assert same["caption_given_image"] == same["caption_given_other_image"]


def test_reranking_needs_vq_features_and_says_so_before_training(tmp_path):
    import pytest

    from omnimask.errors import ConfigError
    from omnimask.train.pretrain import (
        GenerateConfig,
        PretrainConfig,
        PretrainData,
        Pretraining,
    )

    cfg = PretrainConfig(out=str(tmp_path / "run"), generate=GenerateConfig(candidates=4),
                         data=PretrainData(features="patch_encoder"))
    with pytest.raises(ConfigError, match="generate.candidates.*data.features"):
        Pretraining(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # nothing built or written first
    with pytest.raises(ValueError, match="generate.rerank"):
        GenerateConfig(rerank="clip")


def test_cm3_learns_each_images_caption_and_where_it_ends():
    """A learning check of the document format and captioning together: trained on four
    images, each with one caption of its own length, greedy captions reproduce them and stop
    at the <sep> that closes a document's caption (without it they would run to max_new)."""
    from omnimask.train.objectives.base import OBJECTIVES

    ctx = _ctx(cm3_image_first=1.0)
    corpus = _corpus(n=4, seed=3)
    caps = [list(range(30 + 5 * k, 33 + 6 * k)) for k in range(4)]  # 3, 4, 5, 6 plain ids
    corpus.captions = [[c, c] for c in caps]
    model, obj = _model(ctx), OBJECTIVES.create("cm3", ctx)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = obj.loss(model, obj.batch(corpus, [0, 1, 2, 3] * 4, g))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = cg.caption_images(model.eval(), ctx, Tok(ctx), corpus.codes[:4], max_new=12)
    assert out == [" ".join(map(str, c)) for c in caps]


def test_cached_decoding_equals_full_sequences_for_text_and_image_codes():
    ctx = _ctx()
    lo = ctx.vocab.ranges()["image"][0]
    for kw in ({}, {"image_code_input": "features", "image_code_offset": lo}):
        model = _model(ctx, **kw).eval()
        b, im = ctx.sp("bos"), ctx.sp("image")
        # different lengths (a cache per length), one already inside an image
        seqs = [[b, 20, 31, ctx.sp("sep"), im], [b, 40, 41, 42, 43, 44], [b, im, lo + 3, lo + 7]]
        dec = cg.CachedDecoder(model, ctx, seqs, 4)
        g = torch.Generator().manual_seed(0)
        for _ in range(P + 2):  # image codes wrap rows of 4, then past the grid's end
            ref = cg.next_logits(model, ctx, seqs, 4)
            assert torch.allclose(dec.logits, ref, atol=1e-5), kw
            new = [lo + int(torch.randint(CODES, (1,), generator=g)) for _ in seqs]
            for s, t in zip(seqs, new):
                s.append(t)
            dec.advance(new)
        # the whole loop: sampled images with guidance, cached or not, draw the same codes
        caps = [TEXT_IDS, TEXT_IDS[:3]]
        out = [cg.images_from_captions(model, ctx, caps, P, 4, top_k=8, guidance=3.0,
                                       candidates=2, gen=torch.Generator().manual_seed(1))
               for _ in range(2)]
        prompts = [[b, *cg.text_part(ctx, c), im] for c in caps for _ in range(2)]
        allowed = torch.zeros(ctx.vocab.size, dtype=torch.bool)
        allowed[lo:lo + CODES] = True
        slow = cg.generate(model, ctx, prompts, P, allowed, cols=4, temperature=1.0, top_k=8,
                           gen=torch.Generator().manual_seed(1), uncond=[[b, im]] * 4,
                           guidance=3.0, use_cache=False)
        assert torch.equal(out[0], out[1])
        assert torch.equal(ctx.vocab.to_image(torch.tensor(slow)).view(2, 2, P)[:, 0], out[0])
