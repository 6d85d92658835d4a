"""Region tags (OSCAR's object tags): the warm-up's classifiers kept in the image encoder,
and each image token joined by the embeddings of the words it is predicted to show."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from omnimask.errors import ConfigError
from omnimask.fusion.packing import Segment, pack
from omnimask.fusion.trunk import TrunkConfig
from omnimask.modalities.image.encoder import ImageEncoder, ImageEncoderConfig
from omnimask.model import Encoder, ModelConfig
from omnimask.train.data.shapesworld.vocab import COLOR_NAMES
from omnimask.train.encoder_warmup import (
    EncoderWarmupConfig,
    object_patch_accuracy,
    tag_words,
    warm_up_encoder,
)

from .test_encoder_warmup import _scenes

TAGS = [["", "circle", "cross"], ["", *COLOR_NAMES]]


def _encoder_cfg(**kw) -> ImageEncoderConfig:
    return ImageEncoderConfig(dim=32, channels=[8, 16, 32], stem_channels=8, **kw)


def _model(tags=TAGS, ids=None) -> Encoder:
    torch.manual_seed(0)
    ids = ids if ids is not None else [[[] if not w else [10 + 20 * j + i]
                                        for i, w in enumerate(words)]
                                       for j, words in enumerate(tags)]
    cfg = ModelConfig(trunk=TrunkConfig(dim=32, heads=4, layers=1, ffn_dim=64, vocab_size=64),
                      image_input="pixels", image_encoder=_encoder_cfg(tags=tags),
                      image_tag_ids=ids)
    return Encoder(cfg)


def test_tag_words_name_the_warm_up_classes_and_colours():
    train = _scenes(4, 0, colors=True)
    train.seg_classes = ["background", "circle", "class 2"]
    assert tag_words(train, EncoderWarmupConfig(steps=1, tags="all")) == [
        ["", "circle", ""], ["", *COLOR_NAMES]]
    assert tag_words(train, EncoderWarmupConfig(steps=1, tags="classes")) == [
        ["", "circle", ""]]
    train.region_attrs = None  # no colours: the class classifier alone; more classes asked
    assert tag_words(train, EncoderWarmupConfig(steps=1, classes=4, tags="all")) == [
        ["", "circle", "", ""]]
    with pytest.raises(ValueError, match=r"encoder_warmup.tags must be none\|classes"):
        EncoderWarmupConfig(tags="yes")


def test_an_encoder_without_tags_keeps_its_state_dict_keys():
    plain = ImageEncoder(_encoder_cfg())
    tagged = ImageEncoder(_encoder_cfg(tags=TAGS))
    extra = set(tagged.state_dict()) - set(plain.state_dict())
    assert extra == {f"tag_heads.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    out = tagged(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert [tuple(t.shape) for t in out.tags] == [(2, 64, 3), (2, 64, 9)]
    torch.testing.assert_close(out.tags[1].sum(-1), torch.ones(2, 64))
    assert plain(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).tags == ()
    with pytest.raises(ValueError, match="model.image_encoder.tags"):
        _encoder_cfg(tags=[["circle"]])


def test_the_warm_up_trains_the_tag_classifiers_it_leaves_in_the_encoder():
    train, val = _scenes(128, 0, colors=True), _scenes(60, 1, colors=True)
    enc = ImageEncoder(_encoder_cfg(tags=TAGS))
    out = warm_up_encoder(enc, train, val, EncoderWarmupConfig(steps=200, batch_size=16,
                                                               lr=1e-2), seed=0, progress=False)
    enc.eval()
    with torch.no_grad():
        probs = enc(val.pixels).tags
    # the kept classifiers are the ones the warm-up measured
    acc = object_patch_accuracy(probs[0].flatten(0, 1).log(), val.regions.flatten(0, 1).float())
    assert acc == pytest.approx(out["object_patch_accuracy"], abs=1e-4)
    colour = object_patch_accuracy(probs[1].flatten(0, 1).log(),
                                   val.region_attrs.flatten(0, 1).float())
    # learned (chance 0.125); the class accuracy is the warm-up tests' subject
    assert colour == pytest.approx(out["color_patch_accuracy"], abs=1e-4) and colour > 0.6
    # class tags alone: the colour classifier still trains the encoder, then is dropped
    only = ImageEncoder(_encoder_cfg(tags=TAGS[:1]))
    out = warm_up_encoder(only, train, val, EncoderWarmupConfig(steps=2, batch_size=4),
                          seed=0, progress=False)
    assert "color_patch_accuracy" in out and len(only.tag_heads) == 1
    wrong = ImageEncoder(_encoder_cfg(tags=[["", "circle"], TAGS[1]]))
    with pytest.raises(ConfigError, match=r"tags has \[2, 9\].*gives \[3, 9\]"):
        warm_up_encoder(wrong, train, val, EncoderWarmupConfig(steps=1), seed=0,
                        progress=False)


def test_an_image_token_adds_its_predicted_words_embeddings():
    ids = [[[], [3], [4, 5]], [[], *[[20 + i] for i in range(8)]]]
    enc = _model(ids=ids)
    emb = enc.trunk.tok.weight
    words = enc.tag_words()
    # a word's vector: the mean of its tokens' embeddings at the norm of a LayerNorm output
    want = F.normalize((emb[4] + emb[5]) / 2, dim=0) * math.sqrt(32)
    torch.testing.assert_close(words[0][2], want)
    assert torch.equal(words[0][0], torch.zeros(32))
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    batch = pack([[Segment("image", pixels=p, grid=(8, 8))] for p in pixels])
    got = enc.input_features(batch)
    im = enc.embedders["image"]
    feats = im.encoder(pixels)
    ref = im.norm(feats.tokens.flatten(0, 1))
    for probs, w in zip(feats.tags, words):
        ref = ref + probs.flatten(0, 1) @ w
    torch.testing.assert_close(got, ref)
    # the tags train the word embeddings that text reads
    got.sum().backward()
    assert emb.grad[[3, 4, 5, 20]].abs().sum(-1).min() > 0 and emb.grad[6].abs().sum() == 0


def test_tag_ids_must_match_the_tag_words():
    with pytest.raises(ValueError, match="model.image_tag_ids must give token ids"):
        _model(ids=[[[], [1]]])
