"""VQA: packed questions (blocks mask), soft targets, the head's loss, learning, evaluation."""

from __future__ import annotations

import pytest
import torch

import omnimask
from omnimask.errors import OmnimaskError
from omnimask.train.tasks.base import TaskContext
from omnimask.train.tasks.vqa import VQA, VQAConfig, soft_score

from .test_objectives import fit_fixed_batch


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_task_data):
    corpus, ctx = tiny_task_data
    task = VQA(ctx, VQAConfig(questions_per_sequence=3))
    head = task.head_config(corpus)
    model = omnimask.load(tiny_model_dir, heads={"vqa": head})
    task.bind(model)
    return model, corpus, task, head


def test_soft_scores_follow_annotator_agreement():
    assert soft_score(1, 1) == 1.0
    assert [soft_score(c, 10) for c in (0, 1, 2, 3, 4)] == pytest.approx([0, .3, .6, .9, 1])


def test_answer_list_and_priors_come_from_training_data(setup):
    _, corpus, _, head = setup
    counts = {}
    for qs in corpus.qa:
        for q in qs:
            counts[q["answers"][0]] = counts.get(q["answers"][0], 0) + 1
    assert set(head["answers"]) == set(counts)
    assert counts[head["answers"][0]] == max(counts.values())  # most frequent first
    types = {q["type"] for qs in corpus.qa for q in qs}
    assert set(head["priors"]) == types


def test_packed_questions_equal_each_question_alone(setup):
    """Blocks: a question's prediction does not depend on the other questions packed with
    it, and equals encoding [image + that question] as its own sequence."""
    model, corpus, task, _ = setup
    model.eval()
    qs = corpus.qa[0][:3]
    packed = model(task.pack_questions(corpus, [0], [qs]), task="vqa")["logits"]
    for k, q in enumerate(qs):
        alone = model(task.pack_questions(corpus, [0], [[q]]), task="vqa")["logits"]
        torch.testing.assert_close(packed[k], alone[0], atol=1e-5, rtol=1e-5)
    # one question per sequence ([cls + q][image]) is another input layout: it runs too
    task.cfg.questions_per_sequence = 0
    try:
        single = model(task.pack_questions(corpus, [0], [qs]), task="vqa")["logits"]
    finally:
        task.cfg.questions_per_sequence = 3
    assert single.shape == packed.shape


def test_vqa_loss_falls_on_a_fixed_batch(setup):
    model, corpus, task, _ = setup
    model.train()
    g = torch.Generator().manual_seed(0)
    b = task.batch(corpus, list(range(12)), g)
    assert b["target"].shape[0] == len(b["cls"]) and b["target"].sum(1).max() == 1
    first = fit_fixed_batch(lambda: task.loss(model, b), model, "vqa", steps=30, lr=3e-3)
    assert float(task.loss(model, b)["vqa"]) < 0.5 * first


def test_softmax_loss_is_cross_entropy_to_the_normalised_scores():
    from omnimask.heads.vqa import VQAHead, VQAHeadConfig
    from omnimask.model import ModelConfig

    head = VQAHead(ModelConfig(), VQAHeadConfig(num_answers=4, loss="softmax"))
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 0.0, 3.0]])
    target = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.3, 0.0, 0.0, 0.9]])
    head._logits = lambda encoder, batch: (logits, None)  # the loss alone, on fixed logits
    out = head(None, {"target": target, "packed": type("P", (), {"num_tokens": 1})()})
    want = (-torch.log_softmax(logits[0], 0)[1]
            - 0.25 * torch.log_softmax(logits[1], 0)[0]
            - 0.75 * torch.log_softmax(logits[1], 0)[3]) / 2
    torch.testing.assert_close(out["loss"], want)
    torch.testing.assert_close(head.scores(logits).sum(-1), torch.ones(2))
    assert VQAHead(ModelConfig(), VQAHeadConfig(num_answers=4)).scores(logits)[1, 3] == (
        torch.sigmoid(torch.tensor(3.0)))
    with pytest.raises(ValueError, match=r"heads.vqa.loss must be bce\|softmax"):
        VQAHeadConfig(loss="hinge")


def test_question_bias_table_by_hand():
    """log p(a | text) - log p(a | type), the text's counts smoothed towards the type."""
    import math

    from omnimask.train.tasks.vqa import question_bias_table

    red = {"question": "what shape is the red object?", "type": "shape", "answers": ["circle"]}
    blue = {"question": "what shape is the blue object?", "type": "shape",
            "answers": ["cross"]}
    there = {"question": "is there a circle?", "type": "exists", "answers": ["yes"]}
    index = {"circle": 0, "cross": 1, "yes": 2, "no": 3}
    table = question_bias_table([red, red, red, blue, there], index, pseudo=2.0)
    # type shape: circle 3/4, cross 1/4; red: 3 circles of 3 answers, 2 pseudo-counts
    want_red = [math.log((3 + 1.5) / 5 / 0.75), math.log(0.5 / 5 / 0.25), 0.0, 0.0]
    want_blue = [math.log(1.5 / 3 / 0.75), math.log((1 + 0.5) / 3 / 0.25), 0.0, 0.0]
    torch.testing.assert_close(table[red["question"]], torch.tensor(want_red))
    torch.testing.assert_close(table[blue["question"]], torch.tensor(want_blue))
    torch.testing.assert_close(table[there["question"]], torch.zeros(4))  # yes: p = 1 both


def test_debiased_loss_adds_the_bias_in_training_only(setup):
    """debias_question: the batch carries each question's bias row; the loss is the
    cross-entropy of logits + bias, the logits (what evaluation reads) stay the head's."""
    model, corpus, _, _ = setup
    ctx = TaskContext(vocab=model.vocab, text=model.tokenizers["text"], pixels=True)
    task = VQA(ctx, VQAConfig(questions_per_sequence=3, hflip=0.5, debias_question=5.0))
    task.bind(model)
    seen = {}
    pack_questions = task.pack_questions
    task.pack_questions = lambda *a: seen.update(q=a[2]) or pack_questions(*a)
    b = task.batch(corpus, list(range(16)), torch.Generator().manual_seed(0))
    asked = [q for qs in seen["q"] for q in qs]
    assert b["prior"].shape == b["target"].shape and b["prior"].abs().sum() > 0
    for q, row in zip(asked, b["prior"]):  # mirrored texts too: all were counted
        assert q["question"] in task._bias[1]
        torch.testing.assert_close(row, task.question_bias(corpus, q))
    model.eval()
    out = model(b, task="vqa")
    plain = model({k: v for k, v in b.items() if k != "prior"}, task="vqa")
    torch.testing.assert_close(out["logits"], plain["logits"])
    lt, t = plain["logits"] + b["prior"], b["target"]
    assert model.head_configs["vqa"].loss == "bce"
    want = torch.nn.functional.binary_cross_entropy_with_logits(lt, t, reduction="sum")
    torch.testing.assert_close(out["vqa"], want / len(t))
    assert not torch.allclose(out["vqa"], plain["vqa"])


def test_mirror_words_swaps_whole_words_only():
    from omnimask.train.tasks.vqa import HFLIP_WORDS, VFLIP_WORDS, mirror_words

    assert (mirror_words("Is the bright circle left of the square on the right?", HFLIP_WORDS)
            == "Is the bright circle right of the square on the left?")
    assert mirror_words("Left, leftover", HFLIP_WORDS) == "Right, leftover"
    assert mirror_words("is it beneath the top one?", VFLIP_WORDS) == "is it above the bottom one?"
    with pytest.raises(ValueError, match="tasks.vqa.hflip_words"):
        VQAConfig(hflip_words={"Left side": "right"})
    with pytest.raises(ValueError, match="tasks.vqa.vflip must be in"):
        VQAConfig(vflip=1.5)


@pytest.mark.parametrize("flip", [(True, False), (False, True), (True, True)])
def test_mirrored_relation_questions_keep_their_answers(flip):
    """ShapesWorld's geometry: on a mirrored scene, every phrase of a relation that holds
    becomes, through the default word swaps, a phrase of a relation that holds there."""
    import dataclasses
    from types import SimpleNamespace as NS

    import numpy as np

    from omnimask.train.data.shapesworld.language import REL_PHRASES, relations
    from omnimask.train.data.shapesworld.scene import sample_scene

    no_ids = NS(tok=NS(encode=lambda text, add_special_tokens: NS(ids=[])))
    task = VQA(TaskContext(vocab=None, text=no_ids, pixels=True), VQAConfig())
    size, checked = 64, 0
    for s in range(40):
        objs, *_ = sample_scene(np.random.default_rng([7, s]), "train", size)
        mirrored = [dataclasses.replace(o, center=(size - o.center[0] if flip[0] else o.center[0],
                                                   size - o.center[1] if flip[1] else o.center[1]))
                    for o in objs]
        for a, am in zip(objs, mirrored):
            for b, bm in zip(objs, mirrored):
                if a is b:
                    continue
                held = relations(am, bm, size)
                for r in ("left", "right", "above", "below"):
                    for phrase in REL_PHRASES[r]:
                        q = {"question": f"is the a {phrase} the b?", "ids": [], "answers": []}
                        new = task.mirror(q, flip)["question"][len("is the a "):-len(" the b?")]
                        (r2,) = [x for x, ps in REL_PHRASES.items() if new in ps]
                        assert (r in relations(a, b, size)) == (r2 in held)
                        checked += 1
    assert checked > 500


def test_mirrored_batches_flip_pixels_and_questions(setup):
    model, corpus, _, head = setup
    text = model.tokenizers["text"]
    ctx = TaskContext(vocab=model.vocab, text=text, pixels=True)
    task = VQA(ctx, VQAConfig(questions_per_sequence=6, hflip=1.0))  # every question
    task.bind(model)
    seen = {}
    pack_questions = task.pack_questions
    task.pack_questions = lambda *a: seen.update(questions=a[2]) or pack_questions(*a)
    idx = [i for i in range(len(corpus)) if any(q["type"] == "relation" for q in corpus.qa[i])]
    b = task.batch(corpus, idx[:6], torch.Generator().manual_seed(0))
    torch.testing.assert_close(b["packed"].pixels["image"],
                               torch.stack([corpus.pixels[i] for i in idx[:6]]).flip(-1))
    asked = [q for qs in seen["questions"] for q in qs]
    originals = {q["question"]: q for i in idx[:6] for q in corpus.qa[i]}
    swapped = [q for q in asked if q["question"] not in originals]
    assert swapped and all(q["type"] == "relation" for q in swapped)
    for q in swapped:
        assert q["ids"] == text.tok.encode(q["question"], add_special_tokens=False).ids
        back = q["question"].replace("left", "@").replace("right", "left").replace("@", "right")
        assert originals[back]["answers"] == q["answers"]
    # off (the default), the flips draw nothing: the questions are those the plain
    # question sampling picks from the same generator
    plain = VQA(ctx, VQAConfig(questions_per_sequence=3))
    plain.bind(model)
    plain_pack = plain.pack_questions
    plain.pack_questions = lambda *a: seen.update(questions=a[2]) or plain_pack(*a)
    plain.batch(corpus, idx, torch.Generator().manual_seed(0))
    g, want = torch.Generator().manual_seed(0), []
    for i in idx:
        qs = corpus.qa[i]
        want.append([qs[j]["question"] for j in torch.randperm(len(qs), generator=g)[:3].tolist()]
                    if len(qs) > 3 else [q["question"] for q in qs])
    assert [[q["question"] for q in qs] for qs in seen["questions"]] == want


def test_hue_turned_batches_keep_only_hueless_questions(setup):
    """hue_jitter=1: every image with a question that survives a hue turn is turned (greys
    kept, hues moved) and asked only such questions; images with none stay as they are."""
    from omnimask.modalities.image.processor import HUE_WORDS

    model, corpus, _, _ = setup
    ctx = TaskContext(vocab=model.vocab, text=model.tokenizers["text"], pixels=True)
    task = VQA(ctx, VQAConfig(questions_per_sequence=6, hue_jitter=1.0))
    task.bind(model)
    seen = {}
    pack_questions = task.pack_questions
    task.pack_questions = lambda *a: seen.update(q=a[2], turns=a[4]) or pack_questions(*a)
    idx = list(range(12))
    b = task.batch(corpus, idx, torch.Generator().manual_seed(0))
    pixels = b["packed"].pixels["image"]
    turned = 0
    for k, (i, qs, turn) in enumerate(zip(idx, seen["q"], seen["turns"])):
        words = {w for q in qs for t in (q["question"], *q["answers"])
                 for w in t.lower().replace("?", " ").split()}
        hueless = task.hueless(corpus.qa[i])
        if hueless:
            turned += 1
            assert 0 < turn < 2 * 3.15 and not words & set(HUE_WORDS)
            assert {q["question"] for q in qs} <= {q["question"] for q in hueless}
            assert not torch.equal(pixels[k], corpus.pixels[i])
            # a hue turn keeps a pixel's channel mean (brightness) but where it clips
            diff = pixels[k].float().mean(0) - corpus.pixels[i].float().mean(0)
            assert diff.abs().median() <= 0.5
        else:
            assert turn == 0 and torch.equal(pixels[k], corpus.pixels[i])
    assert turned >= 6
    colour = [q for qs in corpus.qa[:12] for q in qs if q["type"] == "color"]
    assert colour and not task.hueless(colour)  # colour questions answer a hue
    none = VQA(ctx, VQAConfig(hue_jitter=1.0, hue_words=[]))  # no hue words: all kept
    assert none.hueless(colour) == colour


def test_hue_copy_asks_the_hue_questions_of_an_untouched_copy(setup):
    """hue_copy: a turned image's hue questions go to an untouched copy of it in the same
    batch, so every question is asked once, hue questions of true colours only."""
    model, corpus, _, _ = setup
    ctx = TaskContext(vocab=model.vocab, text=model.tokenizers["text"], pixels=True)
    task = VQA(ctx, VQAConfig(questions_per_sequence=100, hue_jitter=1.0, hue_copy=True))
    task.bind(model)
    seen = {}
    pack_questions = task.pack_questions
    task.pack_questions = lambda *a: seen.update(i=a[1], q=a[2], turns=a[4]) or \
        pack_questions(*a)
    idx = list(range(12))
    b = task.batch(corpus, idx, torch.Generator().manual_seed(0))
    pixels = b["packed"].pixels["image"]
    assert pixels.shape[0] == len(seen["i"]) > len(idx)  # some images come twice
    for i in idx:
        views = [(k, qs, t) for k, (j, qs, t) in enumerate(zip(seen["i"], seen["q"],
                                                               seen["turns"])) if j == i]
        hueless = task.hueless(corpus.qa[i])
        asked = sorted(q["question"] for _, qs, _ in views for q in qs)
        assert asked == sorted(q["question"] for q in corpus.qa[i])  # each once, none lost
        for k, qs, turn in views:
            if turn:
                assert qs == hueless and not torch.equal(pixels[k], corpus.pixels[i])
            else:
                assert torch.equal(pixels[k], corpus.pixels[i])
                assert not hueless or not task.hueless(qs)  # the copy: hue questions only
        assert len(views) == 1 + (0 < len(hueless) < len(corpus.qa[i]))
    # the targets follow the questions in order
    flat = [q for qs in seen["q"] for q in qs]
    torch.testing.assert_close(b["target"], torch.stack([task._target(q["answers"])
                                                         for q in flat]))


def test_image_tokens_match_a_loop_over_samples():
    from omnimask.fusion.packing import Segment, pack
    from omnimask.heads.vqa import image_tokens

    t = lambda n: Segment("text", ids=torch.arange(n))  # noqa: E731
    im = lambda r, c: Segment("image", features=torch.randn(r * c, 4), grid=(r, c))  # noqa: E731
    p = pack([[t(3), im(2, 3)], [t(5)], [im(4, 4), t(2), im(1, 2)]])
    idx, valid, coords = image_tokens(p)
    cu = p.cu_seqlens.tolist()
    for s in range(3):
        want = [j for j in range(cu[s], cu[s + 1]) if p.modality[j] == 1]
        assert idx[s][valid[s]].tolist() == want
        if want:
            rc = p.position_2d[want].float()
            side = rc.max(0).values.clamp_min(1)
            torch.testing.assert_close(coords[s][valid[s]], 2 * rc / side - 1)
    assert coords[0][valid[0]][[0, -1]].tolist() == [[-1, -1], [1, 1]]


def test_glimpses_keep_packed_questions_independent_and_learn(setup, tiny_model_dir):
    _, corpus, _, head = setup
    g = omnimask.load(tiny_model_dir, heads={"vqa": {**head, "glimpses": 2,
                                                     "relation_probes": 4}})
    t = VQA(TaskContext(vocab=g.vocab, text=g.tokenizers["text"], pixels=True),
            VQAConfig(questions_per_sequence=3))
    t.bind(g)
    g.eval()
    qs = corpus.qa[0][:3]
    packed = g(t.pack_questions(corpus, [0, 1], [qs, corpus.qa[1][:2]]), task="vqa")["logits"]
    for k, q in enumerate(qs):
        alone = g(t.pack_questions(corpus, [0], [[q]]), task="vqa")["logits"]
        torch.testing.assert_close(packed[k], alone[0], atol=1e-5, rtol=1e-5)
    g.train()
    t.cfg.ground_weight = 1.0
    b = t.batch(corpus, list(range(12)), torch.Generator().manual_seed(0))
    before = t.loss(g, b)
    first = fit_fixed_batch(lambda: t.loss(g, b), g, "vqa", steps=30, lr=3e-3)
    after = t.loss(g, b)
    assert float(after["vqa"]) < 0.5 * first
    assert float(after["ground"]) < 0.5 * float(before["ground"])  # the glimpses learn where


def test_grounding_targets_follow_the_instances_through_mirrors(setup, tiny_model_dir):
    _, corpus, _, head = setup
    g = omnimask.load(tiny_model_dir, heads={"vqa": {**head, "glimpses": 2}})
    t = VQA(TaskContext(vocab=g.vocab, text=g.tokenizers["text"], pixels=True),
            VQAConfig(ground_weight=1.0))
    t.bind(g)
    i = next(i for i in range(len(corpus)) if any(q["type"] == "relation" for q in corpus.qa[i]))
    qs = corpus.qa[i]
    for flip in [(False, False), (True, False), (True, True)]:
        tg = t.grounding(corpus, i, flip, qs)
        assert tg.shape == (len(qs), 2, 64)
        inst = corpus.inst[i].flip([d for d, on in zip((-1, -2), flip) if on])
        for k, q in enumerate(qs):
            for r in range(2):
                ids = q["grounding"][r] if r < len(q["grounding"]) else []
                # brute force: each 8x8 cell's count of the role's pixels, normalised
                cells = torch.tensor([[float(sum(int(inst[y, x]) in ids
                                                 for y in range(8 * a, 8 * a + 8)
                                                 for x in range(8 * c, 8 * c + 8)))
                                       for c in range(8)] for a in range(8)]).flatten()
                want = cells / cells.sum() if cells.sum() else cells
                torch.testing.assert_close(tg[k, r], want)
    with pytest.raises(OmnimaskError, match="heads.vqa.glimpses"):
        VQA(t.ctx, VQAConfig(ground_weight=1.0)).bind(omnimask.load(
            tiny_model_dir, heads={"vqa": head}))


def test_question_means_match_a_loop():
    from omnimask.fusion.packing import Segment
    from omnimask.heads.vqa import VQAHeadConfig, question_means
    from omnimask.train.tasks.base import pack_blocks

    t = lambda n: Segment("text", ids=torch.arange(n))  # noqa: E731
    im = Segment("image", features=torch.randn(4, 3), grid=(2, 2))
    b = pack_blocks([im, im], [[t(3), t(5)], [t(2)]])
    h = torch.randn(b["packed"].num_tokens, 6)
    got = question_means(h, b["packed"], b["cls"])
    starts, lens = b["cls"].tolist(), [3, 5, 2]
    for k, (c, n) in enumerate(zip(starts, lens)):
        torch.testing.assert_close(got[k], h[c:c + n].mean(0))
    with pytest.raises(ValueError, match="glimpses >= 2"):
        VQAHeadConfig(glimpses=1, relation_probes=2)


def test_grounding_loss_by_hand():
    from omnimask.heads.vqa import grounding_loss

    attn = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]])
    target = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])  # glimpse 1: no target
    ce, hit = grounding_loss(attn, target)
    torch.testing.assert_close(ce, -torch.log(torch.tensor(0.25)))
    assert float(hit) == 0.0  # glimpse 0 looks hardest at token 0, outside the target
    ce, hit = grounding_loss(attn, torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]]))
    torch.testing.assert_close(ce, (-(0.5 * torch.log(torch.tensor([0.5, 0.25]))).sum()
                                    - torch.log(torch.tensor(0.8))) / 2)
    assert float(hit) == 1.0


def test_glimpses_match_a_loop_over_questions():
    from types import SimpleNamespace

    from omnimask.fusion.packing import Segment
    from omnimask.heads.vqa import VQAHead, VQAHeadConfig, image_tokens
    from omnimask.train.tasks.base import pack_blocks

    torch.manual_seed(0)
    d, G = 6, 3
    t = lambda n: Segment("text", ids=torch.arange(n))  # noqa: E731
    im = lambda r, c: Segment("image", features=torch.randn(r * c, 3), grid=(r, c))  # noqa: E731
    # sample 1 has no image tokens (its glimpses read nothing); grids of different sizes
    b = pack_blocks([im(2, 2), t(4), im(3, 2), im(1, 1)],
                    [[t(3), t(5)], [t(2)], [t(2), t(4), t(1)], [t(2)]])
    p = b["packed"]
    head = VQAHead(SimpleNamespace(trunk=SimpleNamespace(dim=d)),
                   VQAHeadConfig(num_answers=4, glimpses=G)).double()
    h = torch.randn(p.num_tokens, d, dtype=torch.float64)
    cls = b["cls"].long()[torch.tensor([4, 0, 6, 5, 2, 1, 3])]  # any order of the questions
    got, attn = head.glimpse(h, p, cls)
    idx, valid, coords = image_tokens(p)
    cu = p.cu_seqlens.tolist()
    for k, c in enumerate(cls.tolist()):
        s = next(i for i in range(len(cu) - 1) if cu[i] <= c < cu[i + 1])
        img, xy = h[idx[s][valid[s]]], coords[s][valid[s]].double()
        q = head.query(h[c]).view(G, d)
        a = (q @ head.key(img).T / d ** 0.5).softmax(-1)  # [G, n]; [G, 0] without an image
        want = torch.cat([a @ head.value(img), a @ xy], -1).flatten()
        torch.testing.assert_close(got[k], want)
        torch.testing.assert_close(attn[k][:, valid[s]], a)
        assert float(attn[k][:, ~valid[s]].detach().abs().sum()) == 0.0
    alone = cls.tolist().index(int(b["cls"][2]))  # the question of sample 1
    assert not valid[1].any() and float(got[alone].detach().abs().sum()) == 0.0
