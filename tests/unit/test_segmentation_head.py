"""The prompted segmentation head: masked attention, query isolation, post-processing, and
that the decoder learns masks."""

import math

import pytest
import torch

import omnimask
from omnimask.fusion.packing import Segment, pack
from omnimask.heads.segmentation import (
    SegmentHead,
    panoptic_map,
    semantic_map,
    sine_position,
)
from omnimask.train.tasks.base import pack_blocks

HEAD = {"dim": 32, "mask_dim": 16, "queries": 4, "layers": 3, "heads": 2, "ffn_dim": 32,
        "points": 64, "class_names": ["background", "square"]}


def _model():
    torch.manual_seed(0)
    return omnimask.create_model("omnimask-tiny", heads={"segment": HEAD}, **{
        "trunk.layers": 1, "trunk.dim": 32, "trunk.heads": 2, "trunk.ffn_dim": 64,
        "trunk.vocab_size": 300, "image_input": "pixels", "image_encoder.image_size": 16,
        "image_encoder.grid": 4, "image_encoder.channels": [8, 16],
        "image_encoder.stem_channels": 4})


def _batch(images: torch.Tensor, prompts=(), texts=None):
    segs = [Segment("image", pixels=im, grid=(4, 4)) for im in images]
    texts = texts or [[] for _ in segs]
    b = pack_blocks(segs, texts)
    b["classes"] = pack([[Segment("text", ids=torch.tensor([1, 10 + k]))] for k in range(2)])
    b["prompts"] = list(prompts)
    return b


def _squares(n: int, g: torch.Generator):
    """Images of a red and a blue square (3..6 px), one in each half (which half drawn at
    random), on black; and their masks [n, 2, 16, 16] (red, blue)."""
    ims, masks = torch.zeros(n, 3, 16, 16, dtype=torch.uint8), torch.zeros(n, 2, 16, 16)
    for k in range(n):
        flip = bool(torch.randint(2, (1,), generator=g))
        for j in range(2):
            s = int(torch.randint(3, 7, (1,), generator=g))
            r = int(torch.randint(0, 16 - s, (1,), generator=g))
            c = int(torch.randint(0, 8 - s + 1, (1,), generator=g)) + 8 * (j ^ flip)
            ims[k, 2 * j, r:r + s, c:c + s] = 255  # channel 0 red, channel 2 blue
            masks[k, j, r:r + s, c:c + s] = 1
    return ims, masks


def test_cross_attention_mask_opens_empty_rows():
    m = torch.full((1, 2, 8, 8), -5.0)
    m[0, 0, :4] = 5.0  # query 0 predicts the top half; query 1 nothing
    allowed = SegmentHead.cross_allowed(m, (4, 4))
    assert allowed[0, 0].view(4, 4)[:2].all() and not allowed[0, 0].view(4, 4)[2:].any()
    assert allowed[0, 1].all()  # a row with nothing allowed attends everywhere


def test_output_is_finite_when_every_mask_is_empty():
    model = _model().eval()
    g = torch.Generator().manual_seed(0)
    ims, _ = _squares(2, g)
    head = model.heads["segment"]
    with torch.no_grad():
        head.mask_embed[-1].bias.fill_(-1e4)  # every mask logit hugely negative: all blocked
        out = model(_batch(ims), task="segment")
    assert torch.isfinite(out["class_logits"]).all() and torch.isfinite(out["masks"]).all()


def test_prompts_do_not_change_the_object_queries():
    model = _model().eval()
    g = torch.Generator().manual_seed(1)
    ims, _ = _squares(2, g)
    plain = model(_batch(ims), task="segment")
    texts = [[Segment("text", ids=torch.tensor([1, 20, 21]))], []]
    b = _batch(ims, texts=texts)
    b["prompts"] = [
        {"image": 0, "kind": "text", "cls": int(b["cls"][0])},
        {"image": 1, "kind": "point", "clicks": torch.tensor([[0.3, 0.4, 1.0], [0.8, 0.8, 0.0]])},
        {"image": 1, "kind": "box", "box": torch.tensor([0.1, 0.1, 0.5, 0.6])}]
    prompted = model(b, task="segment")
    assert prompted["prompt_masks"].shape == (3, 8, 8)
    # the image tokens never see the expression (blocks), the object queries never see the
    # prompt queries (self-attention mask)
    torch.testing.assert_close(prompted["class_logits"], plain["class_logits"])
    torch.testing.assert_close(prompted["masks"], plain["masks"])


def test_semantic_map_by_hand():
    cls = torch.tensor([[5.0, -5.0, -5.0], [-5.0, 5.0, -5.0]])  # query 0: class 0, 1: class 1
    masks = torch.full((2, 2, 2), -8.0)
    masks[0, 0], masks[1, 1] = 8.0, 8.0
    assert semantic_map(cls, masks).tolist() == [[0, 0], [1, 1]]


def test_panoptic_map_keeps_confident_queries_and_merges_stuff():
    # classes: 0 stuff, 1 thing; last column: no object
    cls = torch.tensor([[9.0, 0, 0], [9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0]])
    masks = torch.full((4, 4, 4), -8.0)
    masks[0, :2, :2] = 8.0  # two stuff queries -> one segment
    masks[1, 2:, :2] = 8.0
    masks[2, :, 2:] = 8.0  # one thing
    masks[3] = 8.0  # a no-object query everywhere: dropped
    ids, classes = panoptic_map(cls, masks, stuff={0})
    assert sorted(classes.values()) == [0, 1]
    stuff = [s for s, c in classes.items() if c == 0][0]
    assert (ids[:, :2] == stuff).all() and (ids[:, 2:] != stuff).all()
    assert ids[:, 2:].unique().numel() == 1 and int(ids[0, 2]) > 0


def test_sine_position_distinguishes_points():
    pe = sine_position(torch.tensor([[0.1, 0.2], [0.1, 0.25], [0.1, 0.2]]), 32)
    assert pe.shape == (3, 32) and torch.equal(pe[0], pe[2]) and not torch.equal(pe[0], pe[1])
    assert float(pe.abs().max()) <= 1.0 and math.isfinite(float(pe.sum()))


def test_the_decoder_learns_to_segment_squares():
    """Semantic, click-prompted and referred ("red" / "blue") masks of unseen images after
    120 steps (the head and the trunk learn; an untrained model's IoU is near 0 and picking
    the square by chance gives a referring IoU near 0.5)."""
    from omnimask.train.segment_metrics import SemanticMeter, mask_iou

    model = _model()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch(ims, masks, train=True):
        words = [Segment("text", ids=torch.tensor([1, 30 + j])) for j in range(2)]
        b = _batch(ims, texts=[words for _ in ims])  # "red", "blue" with every image
        b["prompts"] = []
        for k, m in enumerate(masks):
            b["prompts"] += [{"image": k, "kind": "text", "cls": int(b["cls"][2 * k + j]),
                              "target": j} for j in range(2)]
            rows, cols = torch.nonzero(m[0], as_tuple=True)
            mid = len(rows) // 2
            b["prompts"].append({"image": k, "kind": "point", "clicks": torch.tensor(
                [[(float(cols[mid]) + 0.5) / 16, (float(rows[mid]) + 0.5) / 16, 1.0]])})
        if train:
            b["targets"] = [{"labels": torch.tensor([1, 1, 0]),
                             "masks": torch.cat([m, 1 - m.sum(0, keepdim=True)])}
                            for m in masks]
            b["prompt_masks"] = torch.cat([torch.stack([m[0], m[1], m[0]]) for m in masks])
            b["seed"] = int(torch.randint(1000, (1,), generator=g))
        return b

    for _ in range(120):
        ims, masks = _squares(8, g)
        loss = model(batch(ims, masks), task="segment")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ims, masks = _squares(16, g)
    with torch.no_grad():
        out = model(batch(ims, masks, train=False), task="segment")
    up = torch.nn.functional.interpolate
    sem = SemanticMeter(2)
    refer, click = [], []
    for k in range(16):
        pred = semantic_map(out["class_logits"][k], up(out["masks"][k][None], size=(16, 16),
                                                       mode="bilinear")[0])
        sem.add(pred, masks[k].sum(0).long())
        pm = up(out["prompt_masks"][3 * k:3 * k + 3][None], size=(16, 16),
                mode="bilinear")[0] > 0
        for j, acc in ((0, refer), (1, refer), (2, click)):
            i, u = mask_iou(pm[j], masks[k][j % 2])
            acc.append(i / u)
    assert sem.report()["per_class_iou"]["1"] > 0.45  # 0.60 measured; untrained ~0
    assert sum(click) / len(click) > 0.7  # 0.96 measured
    assert sum(refer) / len(refer) > 0.65  # 0.80 measured; the other square: ~0.5


@pytest.mark.parametrize("bad,match", [({"dim": 30, "heads": 4}, "heads must divide"),
                                       ({"no_object_weight": 2.0}, "no_object_weight"),
                                       ({"class_names": ["a", "a"]}, "repeated"),
                                       ({"class_prompt": "a photo"}, "one {}"),
                                       ({"class_pool": "max"}, "class_pool must be")])
def test_head_settings_are_checked(bad, match):
    from omnimask.errors import OmnimaskError

    with pytest.raises(OmnimaskError, match=match):
        omnimask.create_model("omnimask-tiny", heads={"segment": bad}, image_input="pixels")


@pytest.mark.parametrize("pool", ["cls", "mean", "last"])
def test_class_embeddings_pool_the_prompt_as_configured(pool):
    """Each class name's embedding from its own packed sample: the pooler on <cls>, the mean
    of the tokens after it, or the last token (a loop over the samples as reference)."""
    torch.manual_seed(0)
    m = omnimask.create_model("omnimask-tiny", heads={"segment": HEAD | {"class_pool": pool}},
                              **{"trunk.layers": 1, "trunk.dim": 32, "trunk.heads": 2,
                                 "trunk.ffn_dim": 64, "trunk.vocab_size": 300})
    head = m.heads["segment"]
    names = [[1, 10], [1, 11, 12, 13], [1, 14, 15]]  # <cls> + a name of 1-3 tokens
    classes = pack([[Segment("text", ids=torch.tensor(t))] for t in names])
    with torch.no_grad():
        got = head.class_embeddings(m.encoder, classes)
        want = []
        for t in names:
            one = pack([[Segment("text", ids=torch.tensor(t))]])
            h = m.encoder(one)
            pooled = {"cls": m.encoder.pooled(h, one)[0], "mean": h[1:].mean(0),
                      "last": h[-1]}[pool]
            want.append(torch.nn.functional.normalize(head.class_text(pooled), dim=-1))
    assert got.shape == (4, 32)  # three classes and no-object
    torch.testing.assert_close(got[:3], torch.stack(want), atol=1e-5, rtol=1e-5)
