"""The retrieval head and task: ITM re-ranking, hard negatives, starting from the pretraining
ITC/ITM heads, recall against a brute-force count, and a tiny end-to-end run with speech."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omnimask.errors import OmnimaskError
from omnimask.fusion.packing import Segment, pack
from omnimask.fusion.trunk import TrunkConfig
from omnimask.heads.retrieval import RetrievalHead, rank, sample_negatives
from omnimask.model import ModelConfig, OmniModel

CLS, TEXT = 1, 40


def _model(**kw) -> OmniModel:
    """A tiny model that reads image feature rows (no tokenizers), with the pretraining ITC
    and ITM heads beside the retrieval head."""
    torch.manual_seed(0)
    heads = kw.pop("heads", {"retrieval": {"rerank_k": 3, "batch_size": 4}})
    cfg = ModelConfig(trunk=TrunkConfig(vocab_size=TEXT, dim=32, layers=1, heads=4, ffn_dim=64,
                                        attention_backend="sdpa"),
                      image_feature_dim=8, speech_feature_dim=12, itc_dim=16, **kw)
    return OmniModel(cfg, heads).eval()


def _items(n: int, seed: int = 0) -> tuple[list[Segment], list[Segment], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    texts = [Segment("text", ids=torch.cat([torch.tensor([CLS]),
                                            torch.randint(2, TEXT, (5,), generator=g)]))
             for _ in range(n)]
    images = [Segment("image", features=torch.randn(4, 8, generator=g), grid=(2, 2))
              for _ in range(n)]
    speech = [torch.randn(7, 12, generator=g) for _ in range(n)]
    return texts, images, speech


def brute_recall(scores: torch.Tensor, right: list[set[int]], k: int) -> float:
    """Rank of each row's best right column, ties against the model: hit when fewer than k
    wrong columns score at least as high."""
    hits = 0
    for row, ok in zip(scores.tolist(), right):
        best = max(row[j] for j in ok)
        hits += sum(s >= best for j, s in enumerate(row) if j not in ok) < k
    return hits / len(right)


# -- re-ranking ---------------------------------------------------------------------------
def test_itm_reranking_changes_only_the_top_k_order():
    model = _model()
    head = model.heads["retrieval"]
    assert isinstance(head, RetrievalHead)  # HEADS finds it by name
    texts, images, _ = _items(6)
    torch.nn.init.normal_(head.itm.weight)  # an ITM with opinions of its own
    itc = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    out = head.rerank(model.encoder, itc, [[t] for t in texts], [[im] for im in images], k=3)
    for r in range(6):
        top = set(itc[r].topk(3).indices.tolist())
        assert set(out[r].topk(3).indices.tolist()) == top  # the same k on top
        rest = [c for c in range(6) if c not in top]
        torch.testing.assert_close(out[r, rest], itc[r, rest])  # the others untouched
        assert out[r, list(top)].min() > out[r, rest].max()
    # and the ITM does reorder inside the top k somewhere (else the test shows nothing)
    assert any(out[r].topk(3).indices.tolist() != itc[r].topk(3).indices.tolist()
               for r in range(6))
    torch.testing.assert_close(head.rerank(model.encoder, itc, [], [], k=0), itc)


def test_aligned_toy_gives_recall_one_through_reranking():
    from omnimask.train.metrics import recall_at_k

    model = _model()
    head = model.heads["retrieval"]
    e = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    itc = e @ e.T  # identical text and image embeddings: each text's own image on top
    torch.nn.init.zeros_(head.itm.weight)  # an indifferent ITM keeps the ITC order
    texts, images, _ = _items(5)
    out = head.rerank(model.encoder, itc, [[t] for t in texts], [[im] for im in images], k=3)
    right = [{i} for i in range(5)]
    assert brute_recall(out, right, 1) == 1.0
    assert recall_at_k(out, torch.arange(5), (1,), prefix="t") == {"t2i_r1": 1.0, "i2t_r1": 1.0}
    flat = torch.zeros(5, 5)  # all tied: ties go against the model
    assert brute_recall(flat, right, 1) == 0.0 == recall_at_k(flat, torch.arange(5), (1,))["t2i_r1"]


def test_rank_orders_the_gallery_both_ways_and_for_speech():
    model = _model()
    texts, images, speech = _items(5)
    feats = [im.features for im in images]
    t2i = rank(model, texts, feats, cls=CLS)
    i2t = rank(model, feats, texts, cls=CLS, query_side="image")
    s2i = rank(model, speech, feats, cls=CLS, query_side="speech")
    assert t2i.shape == i2t.shape == s2i.shape == (5, 5)
    head = model.heads["retrieval"]
    with torch.no_grad():
        t = head.embed_texts(model.encoder, texts)
        v = head.embed_images(model.encoder, feats, CLS)
    itc = t @ v.T
    for r in range(5):  # the top 3 by ITC stay the top 3, whatever ITM says
        assert set(t2i[r].topk(3).indices.tolist()) == set(itc[r].topk(3).indices.tolist())
        assert set(i2t[r].topk(3).indices.tolist()) == set(itc.T[r].topk(3).indices.tolist())
    with pytest.raises(Exception, match="cls"):
        rank(model, [[2, 3]], feats)  # ids without a vocabulary: the <cls> id is needed


# -- hard negatives -----------------------------------------------------------------------
def test_hard_negatives_never_pick_a_matching_pair():
    g = torch.Generator().manual_seed(0)
    sim = torch.eye(6) * 50 + torch.randn(6, 6, generator=g)  # positives dominate
    allowed = ~torch.eye(6, dtype=torch.bool)
    allowed[0, 3] = allowed[2, 4] = False  # caption 0 also fits image 3, caption 2 image 4
    allowed[5] = False  # row 5: everything matches, no negative exists
    for hard in (True, False):
        seen = set()
        for _ in range(200):
            pick = sample_negatives(sim, allowed, g, hard)
            assert pick[5] == -1
            for r in range(5):
                assert allowed[r, pick[r]], (r, pick[r])
                seen.add((r, int(pick[r])))
        assert len(seen) > 10  # it draws, not always the same one
    # hard: the most similar allowed image is drawn most often
    sim2 = torch.tensor([[9.0, 8.0, 0.0, 0.0]])
    picks = [int(sample_negatives(sim2, torch.tensor([[False, True, True, True]]), g)[0])
             for _ in range(200)]
    assert picks.count(1) > 150


def test_training_pairs_label_every_matching_pair_positive():
    model = _model()
    head = model.heads["retrieval"]
    texts, images, _ = _items(4)
    match = torch.eye(4, dtype=torch.bool)
    match[1, 2] = True  # caption 1 also describes image 2
    sim = torch.randn(4, 4)
    pairs, labels = head._pairs(sim, match, [[t] for t in texts], images,
                                torch.Generator().manual_seed(0))
    assert labels[:4] == [1, 1, 1, 1] and len(pairs) == len(labels) > 4
    for (t, im), y in zip(pairs, labels):
        i = next(k for k, x in enumerate(texts) if x is t)
        j = next(k for k, x in enumerate(images) if x is im)
        assert bool(match[i, j]) == (y == 1)


def test_batch_marks_shared_captions_and_itm_weight_zero_is_itc_only():
    from omnimask.modalities.vocab import Vocab
    from omnimask.train.corpus import Corpus
    from omnimask.train.tasks.base import TASKS, TaskContext

    g = torch.Generator().manual_seed(0)
    n = 4
    caps = [[[5, 6, 7]], [[8, 9]], [[8, 9], [10, 11, 12]], [[13, 14]]]  # 1 and 2 share one
    lat = torch.randn(n, 4, 8, generator=g).half()
    corpus = Corpus(keys=[str(i) for i in range(n)], captions=caps, spoken=[0, 0, 1, 0],
                    codes=torch.zeros(n, 4, dtype=torch.long), latents=lat, features=lat,
                    grid=(2, 2), speech=[torch.randn(6 + i, 12, generator=g).half()
                                         for i in range(n)],
                    units=[torch.zeros(6 + i, dtype=torch.long) for i in range(n)])
    ctx = TaskContext(vocab=Vocab(text_size=TEXT, specials={"cls": CLS}), text=None,
                      pixels=False)
    task = TASKS.create("retrieval", ctx)
    b = task.batch(corpus, list(range(n)), g)
    assert b["match"][1].tolist() == [False, True, True, False]  # "8 9" fits image 2 too
    assert b["speech_match"][2].tolist() == [False, False, True, False]  # spoken: "10 11 12"
    model = _model(heads={"retrieval": {"itm_weight": 0.0, "rerank_k": 0}})
    out = task.loss(model.train(), b)
    assert float(out["itm"]) == 0.0 and "itm_acc" not in out
    torch.testing.assert_close(out["loss"].detach(), out["itc"] + out["s2i"])
    out["loss"].backward()
    assert model.heads["retrieval"].speech.weight.grad is not None  # s2i trains speech
    itc = torch.randn(2, 3)  # ITC order kept; re-ranking by the untrained ITM refused
    head = model.heads["retrieval"]
    assert torch.equal(head.rerank(model.encoder, itc, [[]] * 2, [[]] * 3), itc)
    with pytest.raises(OmnimaskError, match="itm_weight=0"):
        head.rerank(model.encoder, itc, [[]] * 2, [[]] * 3, k=2)


# -- starting from pretraining -----------------------------------------------------------
def test_starts_from_the_pretraining_itc_and_itm_heads():
    model = _model(itc_batchnorm=True,
                   heads={"itc": None, "itm": None, "retrieval": {"features": "pair"}})
    itc, itm, head = (model.heads[n] for n in ("itc", "itm", "retrieval"))
    texts, images, _ = _items(4)
    cls = Segment("text", ids=torch.tensor([CLS]))
    p = pack([[t] for t in texts] + [[cls, im] for im in images])
    with torch.no_grad():  # move the pretraining heads off their initialisation
        for prm in list(itc.parameters()) + list(itm.parameters()):
            prm.add_(torch.randn_like(prm) * 0.1)
        itc.train()
        itc.embed(model.encoder, p, 4)  # BatchNorm running statistics
        itc.eval()
        keys = head.init_from_pretraining(itc.state_dict(), itm.state_dict())
        assert "norm.text.running_mean" in keys and "itm.weight" in keys
        t0, v0 = itc.embed(model.encoder, p, 4)
        t1 = head.embed_texts(model.encoder, texts)
        v1 = head.embed_images(model.encoder, images, CLS)
        torch.testing.assert_close(t1 @ v1.T, t0 @ v0.T)  # the same ITC scores
        pairs = [[t, im] for t in texts for im in images]
        pp = pack(pairs)
        want = itm.logits(model.encoder, model.encoder(pp), pp)  # a "cls" ITM head
        torch.testing.assert_close(head.itm_logits(model.encoder, pairs), want)
    bad = {k: v for k, v in itc.state_dict().items() if k != "image.weight"}
    with pytest.raises(Exception, match="image.weight"):
        head.init_from_pretraining(bad)


def test_a_cls_head_cannot_start_from_a_pair_itm_head():
    from omnimask.errors import ConfigError

    model = _model(heads={"itc": None, "itm": {"features": "pair"},
                          "retrieval": {"features": "cls"}})
    with pytest.raises(ConfigError, match="features=pair"):
        model.heads["retrieval"].init_from_pretraining(model.heads["itc"].state_dict(),
                                                       model.heads["itm"].state_dict())


def test_config_is_checked():
    from omnimask.errors import ConfigError

    for bad in ({"features": "mean"}, {"rerank_k": -1}, {"batch_size": 0},
                {"itm_weight": 0.0}):  # re-ranking (rerank_k 16) by an untrained ITM
        with pytest.raises(ConfigError, match="retrieval"):
            _model(heads={"retrieval": bad})


# -- the task, end to end on the tiny model directory ----------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir, shapes_dir):
    import omnimask
    from omnimask.train.corpus import build_corpus
    from omnimask.train.data.shards import expand_shards
    from omnimask.train.tasks.base import TASKS, TaskContext

    model = omnimask.load(tiny_model_dir, heads={
        "itc": None, "itm": None, "retrieval": {"rerank_k": 4, "batch_size": 32}})
    toks = model.tokenizers
    corpus = build_corpus(expand_shards([str(shapes_dir / "test-novel-*.tar")]), toks["text"],
                          toks["image"], toks["speech"], progress=False)
    ctx = TaskContext(vocab=model.vocab, text=toks["text"], pixels=True, speech=toks["speech"])
    return model, corpus, TASKS.create("retrieval", ctx)


def test_init_from_a_model_directory(tiny, tiny_model_dir):
    model, corpus, task = tiny
    head = model.heads["retrieval"]
    keys = head.init_from_directory(tiny_model_dir)
    assert "logit_scale" in keys and "itm.weight" in keys
    for k, v in model.heads["itc"].state_dict().items():
        torch.testing.assert_close(head.state_dict()[k], v)


def test_task_trains_and_evaluates_with_speech(tiny, tmp_path):
    model, corpus, task = tiny
    assert corpus.has_speech
    b = task.batch(corpus, list(range(6)), torch.Generator().manual_seed(0))
    assert b["speech"] is not None and b["packed"].num_samples == 18
    assert b["match"].diagonal().all() and b["speech_match"].diagonal().all()
    model.train()
    out = task.loss(model, b)
    assert {"loss", "retrieval", "itc", "itm", "s2i", "itc_acc"} <= set(out)
    torch.testing.assert_close(out["loss"].detach(), out["itc"] + out["s2i"] + out["itm"])
    start = float(out["loss"].detach())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        opt.zero_grad()
        task.loss(model, b)["loss"].backward()
        opt.step()
    with torch.no_grad():
        assert float(task.loss(model, b)["loss"]) < start

    seen = {}  # the score matrices evaluate computes, to count their recalls by brute force
    task.scores = lambda *a: seen.setdefault("sc", type(task).scores(task, *a))
    m = task.evaluate(model, corpus, limit=8, examples=tmp_path)
    keys = [f"{d}_r{k}" for d in ("t2i", "i2t", "s2i") for k in (1, 5, 10)]
    assert set(keys) | {"ceiling_r1", "r_mean"} <= set(m)
    assert all(0.0 <= m[k] <= 1.0 for k in keys + ["ceiling_r1", "r_mean"])
    assert m["t2i_r10"] == m["s2i_r10"] == 1.0  # a gallery of 8 images
    assert (tmp_path / "retrieval_examples.png").stat().st_size > 0
    assert model.training  # evaluation gives the model back in its mode
    sc = seen["sc"]
    owner = sc["text_to_image"].tolist()
    assert len(owner) == sum(len(corpus.captions[i]) for i in range(8))  # every caption
    assert m["t2i_r1"] == pytest.approx(brute_recall(sc["t2i"], [{o} for o in owner], 1))
    own = [{t for t, o in enumerate(owner) if o == i} for i in range(8)]
    assert m["i2t_r5"] == pytest.approx(brute_recall(sc["i2t"], own, 5))
    assert m["s2i_r1"] == pytest.approx(brute_recall(sc["s2i"], [{i} for i in range(8)], 1))
