"""Captioning head: prefix-LM loss, beam search (exact on a tiny vocabulary), KV-cached
decoding equal to full forwards, the no-repeat-n-gram ban, only caption ids generated."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from omnimask.fusion.packing import Segment, pack
from omnimask.fusion.trunk import KVCache, TrunkConfig
from omnimask.heads import captioning as C
from omnimask.modalities.vocab import Vocab
from omnimask.model import ModelConfig, OmniModel

V, END = 4, 3  # the mock vocabulary: tokens 0..2 and the end token


def _table(img: int, seq) -> torch.Tensor:
    """Fixed random next-token log-probabilities of image ``img`` after ``seq``."""
    seed = 7919 * img + sum((t + 1) * 5 ** i for i, t in enumerate(seq))
    return (2 * torch.randn(V, generator=torch.Generator().manual_seed(seed))).log_softmax(-1)


def _mock(B: int, table=_table):
    rows = [(b, []) for b in range(B)]

    def step(idx, toks):
        rows[:] = [(rows[r][0], rows[r][1] + [t]) for r, t in zip(idx.tolist(), toks.tolist())]
        return torch.stack([table(b, s) for b, s in rows])
    return torch.stack([table(b, []) for b in range(B)]), step


def _exhaustive(b: int, max_len: int, alpha: float, n: int) -> list[int]:
    """The best caption of image ``b`` over every sequence, scored as the beam search does."""
    best = None
    for L in range(max_len + 1):
        for seq in itertools.product(range(V - 1), repeat=L):
            if any(seq[i] in C.banned_tokens(list(seq[:i]), n) for i in range(L)) if n else False:
                continue
            lp = torch.tensor(0.0)
            for i in range(L):
                lp = lp + _table(b, seq[:i])[seq[i]]
            cands = []
            if max_len > L:
                cands.append(float(lp + _table(b, seq)[END]) / (L + 1) ** alpha)
            elif L:
                cands.append(float(lp) / L ** alpha)
            for s in cands:
                if best is None or s > best[0]:
                    best = (s, list(seq))
    return best[1]


@pytest.mark.parametrize("alpha,n", [(1.0, 0), (0.0, 0), (2.0, 0), (-0.5, 0), (1.0, 1)])
def test_beam_search_with_every_beam_is_exhaustive_search(alpha, n):
    B, max_len = 3, 3
    first, step = _mock(B)
    got = C.beam_search(first, step, beams=V ** max_len, max_len=max_len, end=END,
                        length_penalty=alpha, no_repeat_ngram=n)
    assert got == [_exhaustive(b, max_len, alpha, n) for b in range(B)]


def test_greedy_is_argmax_and_beam_keeps_more_than_greedy():
    first, step = _mock(2)
    got = C.greedy_search(first, step, max_len=5, end=END)
    for b, seq in enumerate(got):
        want = []
        while len(want) < 5:
            t = int(_table(b, want).argmax())
            if t == END:
                break
            want.append(t)
        assert seq == want


def test_no_repeat_ngram_never_repeats():
    """A model that always prefers the same token: without the ban it repeats forever."""
    def sticky(img, seq):
        return torch.tensor([0.0, -1.0, -2.0, -9.0]).log_softmax(-1)

    def no_end(img, seq):
        return torch.tensor([0.0, -1.0, -2.0, float("-inf")])

    for search in (lambda f, s, n: C.greedy_search(f, s, 9, END, n),
                   lambda f, s, n: C.beam_search(f, s, 3, 9, END, 1.0, n)):
        assert search(*_mock(1, sticky), 0)[0] == [0] * 9
        # n=1, the end token never likely: every token banned after three, the caption
        # ends there (not with a banned token)
        assert sorted(search(*_mock(1, no_end), 1)[0]) == [0, 1, 2]
        for n in (1, 2, 3):
            seq = search(*_mock(1, sticky), n)[0]
            grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
            assert len(grams) == len(set(grams)) and len(seq) >= 2


# -- with a tiny model -------------------------------------------------------------------------
VOCAB = Vocab(text_size=20, image_codes=8, speech_units=4,
              specials={"pad": 0, "cls": 1, "eos": 2, "sep": 3})


def _model(**trunk) -> OmniModel:
    """A tiny random model with peaked logits (N(0, 0.3) weights: no near-ties)."""
    torch.manual_seed(0)
    m = OmniModel(ModelConfig(trunk=TrunkConfig(vocab_size=VOCAB.size, dim=32, layers=2, heads=4,
                                                ffn_dim=48, attention_backend="sdpa", **trunk),
                              image_feature_dim=8, speech_feature_dim=12, image_codes=8,
                              speech_units=4, code_dim=8),
                  {"caption": {"max_len": 8, "beams": 3}})
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    m.vocab = VOCAB
    return m.eval()


def _images(n=3, seed=0):
    return torch.randn(n, 4, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("trunk", [{}, {"prenorm": False, "clip_gamma": -0.03,
                                        "gated_attention": True}])
def test_cached_decoding_equals_uncached_and_only_caption_ids(trunk):
    m = _model(**trunk)
    allowed = C.allowed_ids(VOCAB)
    for kw in ({"beams": 1}, {"beams": 3}, {"beams": 4, "no_repeat_ngram": 2,
                                             "length_penalty": 0.5}):
        cached = C.generate(m, _images(), **kw)
        assert cached == C.generate(m, _images(), use_cache=False, **kw)
        ids = torch.tensor([t for c in cached for t in c])
        assert len(ids) and allowed[ids].all() and not (ids == VOCAB.special("eos")).any()
        assert all(len(c) <= 8 for c in cached)


def test_contrast_is_the_weighted_ratio_over_plausible_tokens():
    """softmax((1 + w) log p - w log q) over the tokens with p >= cutoff * max p, computed
    by hand in float64; banned (-inf) tokens stay out."""
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 7, generator=g, dtype=torch.float64).log_softmax(-1)
    logp[:, 6] = float("-inf")  # a banned id: -inf under both streams
    prior = torch.randn(3, 7, generator=g, dtype=torch.float64).log_softmax(-1)
    prior[:, 6] = float("-inf")
    w, cut = 1.5, 0.3
    got = C.contrast(logp, prior, w, cut)
    p, q = logp.exp(), prior.exp()
    for r in range(3):
        keep = p[r] >= cut * p[r].max()
        want = torch.where(keep, p[r] ** (1 + w) / q[r] ** w, torch.zeros_like(p[r]))
        assert torch.allclose(got[r].exp(), want / want.sum(), atol=1e-12)
        assert got[r, 6] == float("-inf") and not got[r].isnan().any()
    # weight 0 and cutoff 1: only the argmax survives
    assert torch.equal(C.contrast(logp, prior, 0.0, 1.0).argmax(-1), logp.argmax(-1))


def test_decoding_against_the_prior_caches_like_full_forwards():
    """Both streams (with the image and without) on KV caches = full forwards each step,
    and the prior changes what is decoded; a prior of weight w is the hand-made mix of the
    two streams' first-token log-probabilities."""
    m = _model()
    plain = C.generate(m, _images(4))
    changed = False
    for kw in ({"beams": 1}, {"beams": 3}):
        cached = C.generate(m, _images(4), prior_weight=2.0, **kw)
        assert cached == C.generate(m, _images(4), prior_weight=2.0, use_cache=False, **kw)
        changed |= kw["beams"] == 3 and cached != plain
    assert changed
    x = _images(1)[0]
    allowed = C.allowed_ids(VOCAB)
    with torch.no_grad():
        rows = []
        for prefix in ([Segment("image", features=x, grid=(2, 2))], []):
            p = pack([[*prefix, Segment("text", ids=torch.tensor([VOCAB.special("cls")]))]])
            h = m.encoder(p, mask="prefix", prefix_len=[p.num_tokens])
            rows.append(m.encoder.vocab_logits(h, torch.tensor([p.num_tokens - 1]))
                        .masked_fill(~allowed, float("-inf")).log_softmax(-1))
    best = int(C.contrast(rows[0], rows[1], 2.0, 0.1).argmax())
    (first,) = C.generate(m, x[None], beams=1, max_len=1, prior_weight=2.0)
    assert first == ([] if best == VOCAB.special("eos") else [best])


def test_greedy_generate_is_the_argmax_of_full_forwards():
    """beams=1 through the cache = the argmax of the full prefix-LM forward each step."""
    m = _model()
    images = _images(2)
    got = C.generate(m, images, beams=1, max_len=6)
    allowed = C.allowed_ids(VOCAB)
    for x, caption in zip(images, got):
        seq = []
        while len(seq) < 6:
            p = pack([[Segment("image", features=x, grid=(2, 2)),
                       Segment("text", ids=torch.tensor([VOCAB.special("cls"), *seq]))]])
            with torch.no_grad():
                h = m.encoder(p, mask="prefix", prefix_len=[5])
            t = int(m.encoder.vocab_logits(h, torch.tensor([p.num_tokens - 1]))[0]
                    .masked_fill(~allowed, float("-inf")).argmax())
            if t == VOCAB.special("eos"):
                break
            seq.append(t)
        assert caption == seq


def test_training_loss_is_the_decoders_log_likelihood():
    """The head's loss (prefix-LM mask, next token incl. <eos>, over caption ids) = the mean
    -log p the KV-cached decoder gives the same tokens; label smoothing stays finite."""
    m = _model()
    images = _images(2)
    caps = [[5, 9, 7], [11, 4, 6]]
    segs = [Segment("image", features=x, grid=(2, 2)) for x in images]
    b = C.caption_batch(VOCAB, segs, caps, max_len=8)
    with torch.no_grad():
        out = m(b, task="caption")
        cache = KVCache()
        prefix = pack([[s, Segment("text", ids=torch.tensor([1]))] for s in segs])
        h = C._encode(m.encoder, prefix, [5, 5], cache)
        allowed = C.allowed_ids(VOCAB)
        lp = m.encoder.vocab_logits(h, prefix.cu_seqlens[1:].long() - 1)
        nll = []
        for j, tok in enumerate(torch.tensor([c + [2] for c in caps]).T):
            logp = lp.masked_fill(~allowed, float("-inf")).log_softmax(-1)
            nll.append(-logp.gather(1, tok[:, None])[:, 0])
            if j < 3:
                lp = m.encoder.vocab_logits(m.encoder.trunk.step(tok, cache), torch.arange(2))
    torch.testing.assert_close(out["loss"], torch.stack(nll).mean(), atol=1e-5, rtol=1e-5)
    m.heads["caption"].cfg.label_smoothing = 0.1
    m.train()
    smoothed = m(b, task="caption")["loss"]
    assert torch.isfinite(smoothed) and smoothed > out["loss"]
    smoothed.backward()
    assert m.encoder.trunk.tok.weight.grad.abs().sum() > 0


def test_bad_settings_and_inputs():
    m = _model()
    with pytest.raises(Exception, match="beams"):
        C.generate(m, _images(), beams=0)
    mixed = [Segment("image", features=torch.randn(4, 8), grid=(2, 2)),
             Segment("image", features=torch.randn(9, 8), grid=(3, 3))]
    with pytest.raises(Exception, match="one number of tokens"):
        C.generate(m, mixed)
    m.vocab = None
    with pytest.raises(Exception, match="no vocabulary"):
        C.generate(m, _images())
    with pytest.raises(ValueError, match="label_smoothing"):
        C.CaptionHeadConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="prior_cutoff"):
        C.CaptionHeadConfig(prior_cutoff=0.0)
    m.vocab = VOCAB
    with pytest.raises(Exception, match="prior_weight"):
        C.generate(m, _images(), prior_weight=-1.0)


# -- the task, end to end on the tiny model directory ------------------------------------------
def test_caption_task_finetunes_and_evaluates(tiny_model_dir, shapes_dir, tmp_path):
    import omnimask
    from omnimask.heads.captioning import generate
    from omnimask.train.corpus import build_corpus
    from omnimask.train.data.shards import expand_shards
    from omnimask.train.objectives.base import image_segment
    from omnimask.train.tasks.base import TASKS, TaskContext

    model = omnimask.load(tiny_model_dir, heads={"caption": {"max_len": 10, "beams": 2,
                                                             "no_repeat_ngram": 2}})
    toks = model.tokenizers
    corpus = build_corpus(expand_shards([str(shapes_dir / "test-novel-*.tar")]), toks["text"],
                          toks["image"], None, progress=False)
    cls = TASKS.get("caption")
    # METEOR and the PTB tokenizer start a JVM (~20 s): tests/unit/test_caption_metrics.py
    task = cls(TaskContext(vocab=model.vocab, text=toks["text"], pixels=True),
               cls.Config(meteor=False, tokenizer="simple", examples=5))
    task.bind(model)
    assert task.metric == "cider" and task.head.max_len == 10
    g = torch.Generator().manual_seed(0)
    b = task.batch(corpus, list(range(4)), g)
    assert b["prefix_len"] == [len(b["packed"].feature_index["image"]) // 4 + 1] * 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(5):
        out = task.loss(model, b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["caption"]))
    assert losses[-1] < 0.9 * losses[0]
    report = task.evaluate(model, corpus, limit=6, examples=tmp_path)
    for k in ("bleu4", "cider", "meteor", "color_precision", "shape_precision",
              "pair_precision", "color_precision_chance", "shape_precision_chance",
              "pair_precision_chance", "pair_recall", "pair_recall_chance"):
        assert k in report, k
    assert report["images"] == 6 and report["cider"] >= 0 and report["meteor"] is None
    assert (tmp_path / "caption_examples.png").stat().st_size > 10_000
    assert model.training  # evaluation leaves the model as it found it
    # tasks.caption.prior_weight (eval --set) reaches the decoder: the same captions as a
    # direct generate() with it, and the head's setting (0) when unset
    model.eval()
    idx = list(range(6))
    segs = [image_segment(corpus, i, True) for i in idx]
    got = {}
    for w in (None, 3.0):
        task.cfg = cls.Config(meteor=False, tokenizer="simple", prior_weight=w)
        want = [toks["text"].decode(c) for c in generate(model, segs, prior_weight=w or 0.0)]
        got[w] = task.captions(model, corpus, idx)
        assert got[w] == want
    assert got[None] != got[3.0]
    with pytest.raises(ValueError, match="tasks.caption.prior_weight"):
        cls.Config(prior_weight=-1.0)


# -- the word-pair expert (tasks.caption.debias_prior) --------------------------------------
def test_word_bias_table_is_the_smoothed_pair_ratio():
    """log p(w | u) - log p(w | class), by hand in float64: u's next-token counts smoothed
    with K counts of the class's distribution; 0 where the class is never followed by w;
    no row for a class word never seen."""
    from omnimask.train.tasks.caption import word_bias_table

    S, E, size, K = 1, 2, 12, 4.0
    caps = [[5, 8], [5, 8], [5, 9], [6, 9], [6, 10], [7, 5, 8]]  # 5, 6: the class's words
    table = word_bias_table(caps, {5, 6, 11}, S, E, size, K)
    assert set(table) == {5, 6}  # 11 never occurs
    pooled = {8: 3, 9: 2, 10: 1}  # what follows 5 or 6 anywhere
    cls = {w: n / 6 for w, n in pooled.items()}
    after = {5: {8: 3, 9: 1}, 6: {9: 1, 10: 1}}
    for u, counts in after.items():
        n = sum(counts.values())
        for w in range(size):
            want = 0.0
            if w in cls:
                p = (counts.get(w, 0) + K * cls[w]) / (n + K)
                want = math.log(p) - math.log(cls[w])
            assert table[u][w].item() == pytest.approx(want, abs=1e-6), (u, w)
    # a pair never seen: log(K / (n + K)), below 0; a pair seen more than the class: above
    assert table[6][8].item() == pytest.approx(math.log(K / 6)) and table[5][8] > 0


def test_debias_prior_enters_the_loss_as_a_product_of_experts():
    """The head's loss with batch["prior"] = cross-entropy of logits + prior (the prior
    padded past the text ids); a zero prior changes nothing."""
    m = _model()
    segs = [Segment("image", features=x, grid=(2, 2)) for x in _images(2)]
    b = C.caption_batch(VOCAB, segs, [[5, 9, 7], [11, 4, 6]], max_len=8)
    n = len(b["packed"].target_positions)
    prior = torch.randn(n, VOCAB.text_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = m(b, task="caption")["loss"]
        assert m({**b, "prior": torch.zeros(n, VOCAB.text_size)}, task="caption")["loss"] == plain
        got = m({**b, "prior": prior}, task="caption")["loss"]
        p = b["packed"]
        h = m.encoder(p, mask="prefix", prefix_len=b["prefix_len"])
        logits = m.encoder.vocab_logits(h, p.target_positions).float()
        logits[:, :VOCAB.text_size] += prior
        want = C.smoothed_loss(logits, p.targets[p.target_positions], b["allowed"], 0.0)
    torch.testing.assert_close(got, want)
    assert got != plain


def _caption_task(model_dir, shapes_dir, **settings):
    """The caption task bound to the tiny model, with its training corpus."""
    import omnimask
    from omnimask.train.corpus import build_corpus
    from omnimask.train.data.shards import expand_shards
    from omnimask.train.tasks.base import TASKS, TaskContext

    model = omnimask.load(model_dir, heads=["caption"])
    toks = model.tokenizers
    corpus = build_corpus(expand_shards([str(shapes_dir / "train-*.tar")]), toks["text"],
                          toks["image"], None, progress=False)
    cls = TASKS.get("caption")
    task = cls(TaskContext(vocab=model.vocab, text=toks["text"], pixels=True),
               cls.Config(**settings))
    task.bind(model)
    return task, model, corpus


def test_caption_task_debias_rows_follow_the_colour_words(tiny_model_dir, shapes_dir):
    """tasks.caption.debias_prior: each target's prior row is the table's row of the token
    before it (a colour word), zeros after any other token."""
    task, model, corpus = _caption_task(tiny_model_dir, shapes_dir, debias_prior=10.0)
    toks, cls = model.tokenizers, type(task)
    b = task.batch(corpus, list(range(8)), torch.Generator().manual_seed(0))
    p = b["packed"]
    before = p.ids[p.target_positions]
    colours = set(toks["text"].word_ids(["red", "blue", "green", "yellow"]))
    assert colours and b["prior"].shape == (len(before), model.vocab.text_size)
    table = task._bias[1]
    hit = 0
    for k, u in enumerate(before.tolist()):
        if u in table:
            hit += 1
            assert torch.equal(b["prior"][k], table[u])
        else:
            assert not b["prior"][k].any()
    assert hit and set(table) <= set(toks["text"].word_ids(cls.Config().debias_words))
    assert colours & set(table)
    with pytest.raises(ValueError, match="tasks.caption.debias_prior"):
        cls.Config(debias_prior=-1.0)
    with pytest.raises(Exception, match="tasks.caption.debias_words"):
        cls(task.ctx, cls.Config(debias_prior=10.0, debias_words=["zzqxv"]))


def test_caption_task_hue_copies_hide_the_colour_words(tiny_model_dir, shapes_dir):
    """tasks.caption.hue_copy=1: every image twice, the copy hue-turned with its caption's
    colour words read as <mask> and not predicted; the originals as without copies."""
    from omnimask.modalities.image.processor import HUE_WORDS

    plain, model, corpus = _caption_task(tiny_model_dir, shapes_dir)
    task = _caption_task(tiny_model_dir, shapes_dir, hue_copy=1.0)[0]
    idx = list(range(6))
    b = task.batch(corpus, idx, torch.Generator().manual_seed(0))
    ref = plain.batch(corpus, idx, torch.Generator().manual_seed(0))
    p, r = b["packed"], ref["packed"]
    n = len(r.cu_seqlens) - 1
    assert len(p.cu_seqlens) - 1 == 2 * n and b["prefix_len"] == ref["prefix_len"] * 2
    end = int(r.cu_seqlens[-1])
    assert torch.equal(p.ids[:end], r.ids) and torch.equal(p.targets[:end], r.targets)
    hues = torch.tensor(model.tokenizers["text"].word_ids(HUE_WORDS))
    mask = model.vocab.special("mask")
    hid = 0
    for k in range(n):  # copy k against original k: hue words masked and unscored
        o = slice(int(r.cu_seqlens[k]), int(r.cu_seqlens[k + 1]))
        c = slice(end + o.start, end + o.stop)
        gone = torch.isin(r.ids[o], hues)
        hid += int(gone.sum())
        assert torch.equal(p.ids[c], r.ids[o].masked_fill(gone, mask))
        assert torch.equal(p.targets[c], r.targets[o].masked_fill(torch.isin(r.targets[o], hues),
                                                                  -100))
    assert hid > 0
    # the copies' pixels turned about the grey axis: other colours, the same R + G + B up
    # to rounding and clipping; the originals' untouched
    px, rx = p.pixels["image"], r.pixels["image"]
    assert torch.equal(px[:n], rx)
    for k in range(n):
        assert not torch.equal(px[n + k], rx[k])
        total = px[n + k].int().sum(0) - rx[k].int().sum(0)
        assert total.abs().float().mean() < 3
    with pytest.raises(ValueError, match="tasks.caption.hue_copy"):
        type(task).Config(hue_copy=1.5)
