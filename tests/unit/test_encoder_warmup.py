"""The image encoder's region-label warm-up and the frozen encoder it leaves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from omnimask.errors import ConfigError
from omnimask.modalities.image.encoder import ImageEncoder, ImageEncoderConfig
from omnimask.train.corpus import patch_classes
from omnimask.train.data.shapesworld.scene import SceneObject, _instance_map, _render
from omnimask.train.data.shapesworld.vocab import COLOR_NAMES, COLORS, SIZES
from omnimask.train.encoder_warmup import (
    EncoderWarmupConfig,
    hue_jittered,
    object_patch_accuracy,
    warm_up_encoder,
)


@dataclass
class Labelled:  # what the warm-up reads of a corpus
    pixels: torch.Tensor | None
    regions: torch.Tensor | None
    region_attrs: torch.Tensor | None = None
    region_colors: list[str] | None = None

    def __len__(self) -> int:
        return len(self.pixels)


def _scenes(n: int, seed: int, shapes=("circle", "cross"), size: int = 64,
            colors: bool = False) -> Labelled:
    """One large object per image; seg.png's classes: 0 background, 1 + the shape's index;
    colour attributes 0 background, 1 + the colour's index."""
    rng = np.random.default_rng(seed)
    images, segs, attrs = [], [], []
    for i in range(n):
        lo, hi = SIZES["large"]
        r = float(rng.uniform(lo, hi)) * size
        cx, cy = (float(v) for v in rng.uniform(1.2 * r + 1, size - 1.2 * r - 1, 2))
        color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        obj = SceneObject(id=1, shape=shapes[i % 2], color=color, size="large",
                          center=(cx, cy), radius=r, rotation=float(rng.uniform(0, 360)),
                          rgb=COLORS[color], novel=False)
        images.append(torch.from_numpy(_render(rng, [obj], size)).permute(2, 0, 1))
        inst = torch.from_numpy(_instance_map([obj], size).astype(np.int64))
        segs.append(inst * (1 + i % 2))
        attrs.append(inst * (1 + COLOR_NAMES.index(color)))
    out = Labelled(torch.stack(images).contiguous(), patch_classes(torch.stack(segs), 8))
    if colors:
        out.region_attrs = patch_classes(torch.stack(attrs), 8, 1 + len(COLOR_NAMES))
        out.region_colors = list(COLOR_NAMES)
    return out


def _encoder(**kw) -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder(ImageEncoderConfig(dim=32, channels=[8, 16, 32], stem_channels=8, **kw))


def test_object_patch_accuracy_counts_only_patches_an_object_covers():
    target = torch.tensor([[1.0, 0, 0], [0.4, 0.6, 0], [0.2, 0, 0.8], [0.3, 0.7, 0]])
    logits = torch.tensor([[0.0, 9, 0], [0, 9, 0], [0, 9, 0], [0, 9, 0]])
    # row 0 is background (not counted); rows 1 and 3 right, row 2 wrong
    assert object_patch_accuracy(logits, target) == pytest.approx(2 / 3)


def test_warm_up_teaches_the_encoder_the_shapes_and_leaves_it_frozen():
    train, val = _scenes(256, 0), _scenes(100, 1)
    enc = _encoder(frozen=True)
    assert not any(p.requires_grad for p in enc.parameters())
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    out = warm_up_encoder(enc, train, val, EncoderWarmupConfig(steps=200, batch_size=16,
                                                               lr=1e-2), seed=0, progress=False)
    # 0.93 when written, ~10 s on 2 cores; the untrained head reads 0.55 (chance 0.5)
    assert out["object_patch_accuracy"] > 0.8 and out["object_patch_accuracy_before"] < 0.7
    assert out["classes"] == 3 and out["chance"] == 0.5 and "color_patch_accuracy" not in out
    assert not torch.equal(enc.state_dict()["proj.weight"], before["proj.weight"])
    # frozen again: no gradients, and its BatchNorms keep their statistics in training mode
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    stats = enc.state_dict()["body.stem.1.running_mean"].clone()
    enc(train.pixels[:8])
    assert torch.equal(enc.state_dict()["body.stem.1.running_mean"], stats)
    assert all(not m.training for m in enc.modules() if m is not enc)


def test_warm_up_in_bf16_runs_its_convolutions_in_bf16_and_learns():
    train, val = _scenes(256, 0), _scenes(100, 1)
    enc, seen = _encoder(), []
    conv = next(m for m in enc.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
    out = warm_up_encoder(enc, train, val, EncoderWarmupConfig(steps=200, batch_size=16,
                                                               lr=1e-2, precision="bf16"),
                          seed=0, progress=False)
    # training steps in bf16, the accuracies before and after in fp32; weights stay fp32
    assert {d for t, d in seen if t} == {torch.bfloat16}
    assert {d for t, d in seen if not t} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in enc.parameters())
    assert out["precision"] == "bf16" and out["object_patch_accuracy"] > 0.8  # fp32: 0.93


@pytest.mark.parametrize("native", [True, False])
def test_warm_up_precision_auto_is_bf16_only_where_the_cpu_computes_it(native, monkeypatch):
    import omnimask.train.trainer as trainer

    monkeypatch.setattr(trainer, "native_bf16", lambda device: native)
    train, val = _scenes(8, 0), _scenes(4, 1)
    out = warm_up_encoder(_encoder(), train, val, EncoderWarmupConfig(steps=1, batch_size=4,
                                                                      precision="auto"),
                          seed=0, progress=False)
    assert out["precision"] == ("bf16" if native else "fp32")
    with pytest.raises(ValueError, match=r"encoder_warmup.precision must be fp32\|bf16\|auto"):
        EncoderWarmupConfig(precision="fp16")


def test_warm_up_learns_object_colours_where_the_corpus_has_them():
    train, val = _scenes(128, 0, colors=True), _scenes(60, 1, colors=True)
    # the validation corpus lists its colours in another order: aligned by name
    perm = [0, *(1 + torch.randperm(len(COLOR_NAMES), generator=torch.Generator()
                                  .manual_seed(0))).tolist()]
    val.region_attrs = val.region_attrs[..., perm]
    val.region_colors = [COLOR_NAMES[i - 1] for i in perm[1:]]
    out = warm_up_encoder(_encoder(), train, val, EncoderWarmupConfig(steps=200, batch_size=16,
                                                                      lr=3e-3),
                          seed=0, progress=False)
    # 0.9 when written (chance 0.125); misaligned colours would score near chance
    assert out["colors"] == 8 and out["color_patch_accuracy"] > 0.7
    assert out["color_patch_accuracy_before"] < 0.3


def test_warm_up_is_a_function_of_its_seed():
    train, val = _scenes(32, 0), _scenes(8, 1)
    cfg = EncoderWarmupConfig(steps=3, batch_size=4)
    a, b = _encoder(), _encoder()
    warm_up_encoder(a, train, val, cfg, seed=5, progress=False)
    warm_up_encoder(b, train, val, cfg, seed=5, progress=False)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)


def test_warm_up_refuses_data_without_labels_or_with_more_classes():
    train, val = _scenes(8, 0), _scenes(4, 1)
    with pytest.raises(ConfigError, match="encoder_warmup.classes is 2 but data.train"):
        warm_up_encoder(_encoder(), train, val, EncoderWarmupConfig(steps=1, classes=2),
                        seed=0, progress=False)
    with pytest.raises(ConfigError, match="seg.png.*data.val has none"):
        warm_up_encoder(_encoder(), train, Labelled(val.pixels, None),
                        EncoderWarmupConfig(steps=1), seed=0, progress=False)
    with pytest.raises(ValueError, match="encoder_warmup.batch_size"):
        EncoderWarmupConfig(batch_size=0)


def test_hue_jitter_turns_a_share_and_teaches_shapes_not_colours_of_turned_images():
    train, val = _scenes(128, 0, colors=True), _scenes(60, 1, colors=True)
    pixels, kept = hue_jittered(train.pixels[:64], 0.5, torch.Generator().manual_seed(0))
    assert 10 < int((~kept).sum()) < 54
    assert torch.equal(pixels[kept], train.pixels[:64][kept])  # the others untouched
    assert all(not torch.equal(a, b) for a, b in zip(pixels[~kept], train.pixels[:64][~kept]))
    # every image turned: the shapes are still learned, the colours (their loss skipped) not
    out = warm_up_encoder(_encoder(), train, val,
                          EncoderWarmupConfig(steps=200, batch_size=16, lr=3e-3,
                                              hue_jitter=1.0), seed=0, progress=False)
    assert out["object_patch_accuracy"] > 0.8
    assert out["color_patch_accuracy"] < 0.3  # 0.9 without the jitter (the test above)
    with pytest.raises(ValueError, match="encoder_warmup.hue_jitter"):
        EncoderWarmupConfig(hue_jitter=1.5)
