"""Trainable pixel encoder: token grid in raster order, feature maps, gradients, timm
backbones without downloads, config and input errors, a learning check on ShapesWorld, and
the corpus keeping the shard images' pixels."""

from __future__ import annotations

import io
import socket
import tarfile
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from omnimask.errors import OmnimaskError
from omnimask.modalities.image.encoder import ImageEncoder, ImageEncoderConfig, ImageFeatures
from omnimask.train.data.shapesworld.scene import SceneObject, _render
from omnimask.train.data.shapesworld.vocab import COLOR_NAMES, COLORS, SIZES

TINY = dict(dim=16, channels=[8, 8, 16], stem_channels=4)


def _pixels(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: weights are never fetched."""
    def refuse(*a, **k):
        raise AssertionError("the image encoder tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_conv_stem_shapes_and_raster_order():
    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderConfig(**TINY)).eval()
    x = _pixels()
    out = enc(x)
    assert isinstance(out, ImageFeatures)
    assert out.tokens.shape == (2, 64, 16) and torch.isfinite(out.tokens).all()
    assert [tuple(m.shape) for m in out.maps] == [(2, 8, 32, 32), (2, 8, 16, 16), (2, 16, 8, 8)]
    assert enc.map_strides == [2, 4, 8] and enc.map_channels == [8, 8, 16]
    # a change inside the top-left 8x8 patch moves token 0 (row 0, col 0) far more than
    # token 63 (row 7, col 7): tokens are in raster order, like the VQ codes
    y = x.clone()
    y[:, :, :8, :8] = 255 - y[:, :, :8, :8]
    d = (enc(y).tokens - out.tokens).norm(dim=-1)  # [B, 64]
    assert (d[:, 0] > 10 * d[:, 63]).all() and (d[:, 0] > 0).all()
    # and in the bottom-right patch: the other way round
    y = x.clone()
    y[:, :, -8:, -8:] = 255 - y[:, :, -8:, -8:]
    d = (enc(y).tokens - out.tokens).norm(dim=-1)
    assert (d[:, 63] > 10 * d[:, 0]).all()


@pytest.mark.parametrize("norm", ["groupnorm", "batchnorm", "none"])
def test_gradients_reach_every_parameter(norm):
    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderConfig(**TINY, norm=norm))
    out = enc(_pixels())
    (out.tokens.square().mean() + sum(m.square().mean() for m in out.maps)).backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_timm_backbone_by_name_without_downloads(no_network):
    import timm

    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderConfig(backbone="resnet10t", dim=16))
    out = enc(_pixels())
    assert out.tokens.shape == (2, 64, 16)
    # features_only, stages up to stride 8 (8x8 at 64 px); the deeper ones are not built
    assert enc.map_strides == [2, 4, 8]
    assert [m.shape[-1] for m in out.maps] == [32, 16, 8]
    assert not any(n.startswith("body.model.layer3") for n, _ in enc.named_parameters())
    # its own pixel statistics, in 0-255 units
    mean = timm.models.get_pretrained_cfg("resnet10t").mean
    assert torch.allclose(enc.mean.flatten(), torch.tensor(mean) * 255)
    out.tokens.square().mean().backward()
    assert all(p.grad is not None for p in enc.parameters())  # trainable end to end


def test_timm_stage_wider_than_the_grid_is_pooled(no_network):
    # 48 px, grid 4: reductions 2/4/8/16 give 24/12/6/3 -> the stride-8 map, pooled 6 -> 4
    enc = ImageEncoder(ImageEncoderConfig(backbone="resnet10t", dim=8, image_size=48, grid=4))
    out = enc(_pixels(size=48))
    assert out.tokens.shape == (2, 16, 8) and out.maps[-1].shape[-1] == 6


@pytest.mark.parametrize("kw,key", [
    (dict(dim=0), "model.image_encoder.dim"),
    (dict(image_size=0), "model.image_encoder.image_size"),
    (dict(grid=7), "model.image_encoder.grid"),
    (dict(grid=128), "model.image_encoder.grid"),
    (dict(image_size=48, grid=8), "model.image_encoder.grid"),  # 48/8 = 6: no power of 2
    (dict(channels=[32, 64]), "model.image_encoder.channels"),
    (dict(channels=[32, 0, 64]), "model.image_encoder.channels"),
    (dict(depth=0), "model.image_encoder.depth"),
    (dict(stem_channels=-1), "model.image_encoder.stem_channels"),
    (dict(groups=0), "model.image_encoder.groups"),
    (dict(norm="layernorm"), "model.image_encoder.norm"),
    (dict(backbone=""), "model.image_encoder.backbone"),
    (dict(backbone="no_such_net"), "model.image_encoder.backbone"),
])
def test_bad_config_names_the_key(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ImageEncoderConfig(**kw)


def test_timm_grid_finer_than_every_stage_names_the_key(no_network):
    with pytest.raises(ValueError, match=r"model\.image_encoder\.grid"):
        ImageEncoder(ImageEncoderConfig(backbone="resnet10t", grid=64))


def test_the_config_loads_from_a_dict():
    cfg = ImageEncoderConfig(**asdict(ImageEncoderConfig(**TINY)))
    assert cfg == ImageEncoderConfig(**TINY) and cfg.tokens == 64


def test_float_or_misshapen_input_is_refused():
    enc = ImageEncoder(ImageEncoderConfig(**TINY))
    with pytest.raises(OmnimaskError, match="uint8 pixels .* got torch.float32"):
        enc(_pixels().float() / 255)
    with pytest.raises(OmnimaskError, match=r"got shape \(2, 3, 32, 32\)"):
        enc(_pixels(size=32))
    with pytest.raises(OmnimaskError, match=r"got shape \(3, 64, 64\)"):
        enc(_pixels()[0])


def _one_shape_scenes(shapes, n, seed, size=64, sizes=("large",)):
    """``n`` ShapesWorld renderings of one object each, cycling through ``shapes`` (label:
    the index), with random colour, place and rotation on a textured background."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        lo, hi = SIZES[sizes[int(rng.integers(len(sizes)))]]
        r = float(rng.uniform(lo, hi)) * size
        cx, cy = (float(v) for v in rng.uniform(1.2 * r + 1, size - 1.2 * r - 1, 2))
        color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        obj = SceneObject(id=1, shape=shapes[i % len(shapes)], color=color, size="", center=(cx, cy),
                          radius=r, rotation=float(rng.uniform(0, 360)), rgb=COLORS[color],
                          novel=False)
        images.append(torch.from_numpy(_render(rng, [obj], size)).permute(2, 0, 1))
        labels.append(i % len(shapes))
    return torch.stack(images).contiguous(), torch.tensor(labels)


def test_a_classifier_on_the_conv_stem_learns_two_shapes():
    # a narrow stem (the default widths are 4-8x wider), max-pooled tokens, a linear layer:
    # ~1300 images through it, a few seconds on 2 cores; 0.98 held out when written
    shapes = ("circle", "cross")
    x, y = _one_shape_scenes(shapes, 256, seed=0)
    xt, yt = _one_shape_scenes(shapes, 200, seed=1)
    torch.manual_seed(0)
    enc = ImageEncoder(ImageEncoderConfig(dim=32, channels=[8, 16, 32], stem_channels=8))
    head = torch.nn.Linear(32, 2)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for idx in torch.randperm(len(x), generator=g).split(16):
            loss = F.cross_entropy(head(enc(x[idx]).tokens.amax(1)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (head(enc.eval()(xt).tokens.amax(1)).argmax(1) == yt).float().mean().item()
    assert acc >= 0.85, acc  # chance: 0.5


# -- corpus ----------------------------------------------------------------------------

def _shard_images(paths):
    """key -> the shard's image.png decoded straight from the tar: [3, H, W] uint8."""
    out = {}
    for p in paths:
        with tarfile.open(p) as t:
            for m in t.getmembers():
                if m.name.endswith(".image.png"):
                    im = Image.open(io.BytesIO(t.extractfile(m).read())).convert("RGB")
                    out[m.name[:-len(".image.png")]] = torch.from_numpy(
                        np.array(im)).permute(2, 0, 1)
    return out


@pytest.fixture
def tokenizers():
    from omnimask.modalities.image.tokenizer import ImageTokenizer
    from omnimask.modalities.image.vq import VQVAE, VQConfig
    from omnimask.modalities.text.tokenizer import TextTokenizer, TextTokenizerConfig

    torch.manual_seed(0)
    image = ImageTokenizer(VQVAE(VQConfig(quantizer="vq", downsample=3, channels=[4, 4, 4],
                                          code_dim=4, codebook_size=16)))
    text = TextTokenizer.train(["a red circle left of a blue cross"],
                               TextTokenizerConfig(vocab_size=300, min_frequency=1))
    return {"text": text, "image": image}


def test_corpus_keeps_the_shard_pixels_and_old_caches_rebuild(small_shards, tokenizers,
                                                              tmp_path):
    from omnimask.safeio import load_tree, save_tree
    from omnimask.train import corpus as C

    shards = sorted(str(p) for p in small_shards.glob("train-*.tar"))[:2]
    path = tmp_path / "corpus-train.safetensors"
    names = {"text": None, "image": None}
    c = C.load_or_build(path, shards, names, tokenizers, progress=False)
    ref = _shard_images(shards)
    assert c.pixels is not None and c.pixels.dtype == torch.uint8
    assert c.pixels.shape == (len(c), 3, 64, 64) and len(c) == len(ref) == 20
    for i, key in enumerate(c.keys):
        assert torch.equal(c.pixels[i], ref[key]), key
    # saved and loaded with the rest
    assert torch.equal(C.Corpus(**load_tree(path)["corpus"]).pixels, c.pixels)
    assert torch.equal(C.load_or_build(path, shards, names, tokenizers, progress=False).pixels,
                       c.pixels)

    # a cache written before pixels were kept (fingerprint version 1) is rebuilt, not reused
    old = C._fingerprint(shards, {"tokenizers": {k: "" for k in names}, "features": "vq",
                                  "patch_encoder": "vit_tiny_patch16_224", "version": 1})
    fields = {k: v for k, v in load_tree(path)["corpus"].items() if k != "pixels"}
    save_tree(path, {"fingerprint": old, "corpus": fields})
    again = C.load_or_build(path, shards, names, tokenizers, progress=False)
    assert again.pixels is not None and torch.equal(again.pixels, c.pixels)


def test_shared_corpus_cache_is_reused_and_never_written_through(small_shards, tokenizers,
                                                                tmp_path, monkeypatch):
    from omnimask.train import corpus as C

    shards = sorted(str(p) for p in small_shards.glob("train-*.tar"))[:1]
    names = {"text": None, "image": None}
    src, dst, other = tmp_path / "pre", tmp_path / "ft", tmp_path / "other"
    c = C.load_or_build(src / "corpus-train.safetensors", shards, names, tokenizers,
                        progress=False)
    before = (src / "corpus-train.safetensors").read_bytes()
    assert C.share_cache(src, dst) == ["train"]  # no val cache to share
    assert C.share_cache(src, dst) == []  # never over a cache the run has
    built = []
    real = C.build_corpus
    monkeypatch.setattr(C, "build_corpus", lambda *a, **k: built.append(1) or real(*a, **k))
    again = C.load_or_build(dst / "corpus-train.safetensors", shards, names, tokenizers,
                            progress=False)
    assert not built and again.keys == c.keys and torch.equal(again.pixels, c.pixels)
    # a shared cache of other shards is rebuilt at the destination; the source keeps its own
    C.share_cache(src, other)
    more = sorted(str(p) for p in small_shards.glob("train-*.tar"))[1:2]
    rebuilt = C.load_or_build(other / "corpus-train.safetensors", more, names, tokenizers,
                              progress=False)
    assert built and rebuilt.keys != c.keys
    assert (src / "corpus-train.safetensors").read_bytes() == before


def test_corpus_region_labels_are_the_shards_seg_and_object_colours(small_shards, tokenizers,
                                                                     tmp_path):
    import json

    from omnimask.train import corpus as C

    shards = sorted(str(p) for p in small_shards.glob("train-*.tar"))[:1]
    c = C.load_or_build(tmp_path / "c.safetensors", shards, {"text": None, "image": None},
                        tokenizers, progress=False)
    seg, inst, meta = {}, {}, {}
    with tarfile.open(shards[0]) as t:
        for m in t.getmembers():
            key, _, ext = m.name.partition(".")
            data = t.extractfile(m).read() if m.isfile() else b""
            if ext in ("seg.png", "inst.png"):
                arr = torch.from_numpy(np.array(Image.open(io.BytesIO(data))).astype(np.int64))
                (seg if ext == "seg.png" else inst)[key] = arr
            elif ext == "meta.json":
                meta[key] = json.loads(data)
    assert c.region_colors == sorted({o["color"] for m in meta.values() for o in m["objects"]})
    for i, key in enumerate(c.keys):
        # patch (r, c) of 8x8 pixels: the fraction of its pixels of each class, by a loop
        for p in range(64):
            r, q = divmod(p, 8)
            s = seg[key][8 * r:8 * r + 8, 8 * q:8 * q + 8].flatten().tolist()
            want = [s.count(k) / 64 for k in range(c.regions.shape[-1])]
            torch.testing.assert_close(c.regions[i, p].float(), torch.tensor(want), atol=1e-3,
                                       rtol=0)
            color = {o["id"]: 1 + c.region_colors.index(o["color"])
                     for o in meta[key]["objects"]}
            ids = [color.get(v, 0) for v in inst[key][8 * r:8 * r + 8, 8 * q:8 * q + 8]
                   .flatten().tolist()]
            want = [ids.count(k) / 64 for k in range(1 + len(c.region_colors))]
            torch.testing.assert_close(c.region_attrs[i, p].float(), torch.tensor(want),
                                       atol=1e-3, rtol=0)
    assert c.regions.float().sum(-1).sub(1).abs().max() < 1e-2


def test_color_path_is_shape_blind_and_local_to_its_patch():
    """Each token sees only its own patch's set of pixel colours: shuffling the pixels inside
    a patch (its shape) changes nothing, a pixel changed in one patch moves that token
    alone; the zero-initialised projection starts at 0."""
    from omnimask.modalities.image.embedder import ColorPath

    torch.manual_seed(0)
    path = ColorPath(8, 16, grid=4)
    img = (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8)
    assert path(img).abs().max() == 0
    torch.nn.init.normal_(path.proj.weight)
    out = path(img)
    assert out.shape == (1, 16, 16) and out.abs().max() > 0
    shuffled = img.clone()
    for r in range(4):
        for c in range(4):
            patch = shuffled[0, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8].reshape(3, 64)
            perm = torch.randperm(64)
            shuffled[0, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = patch[:, perm].view(3, 8, 8)
    torch.testing.assert_close(path(shuffled), out)
    grey = torch.full_like(img, 128)
    moved = grey.clone()
    moved[0, :, 9, 18] = torch.tensor([255, 0, 0], dtype=torch.uint8)  # patch (1, 2)
    changed = (path(moved) - path(grey)).abs().amax(-1)[0]
    assert changed[1 * 4 + 2] > 0 and (changed.nonzero().flatten() == 1 * 4 + 2).all()
