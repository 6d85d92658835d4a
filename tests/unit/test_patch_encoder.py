"""timm patch encoder: token shapes for ViT and ConvNeXt; weights only from the local cache."""

import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from omnimask.errors import OmnimaskError
from omnimask.modalities.image.patch_encoder import PatchEncoder

X = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)


@pytest.mark.parametrize("name,tokens", [("vit_tiny_patch16_224", 64), ("convnext_atto", 4)])
def test_patch_tokens(name, tokens):
    enc = PatchEncoder(name, image_size=64, patch_size=8)
    out = enc(X)
    assert out.shape == (2, tokens, enc.dim) and torch.isfinite(out).all()


def test_pretrained_without_cache_fails_unless_asked_to_fall_back(caplog, tmp_path,
                                                                  monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OmnimaskError, match="no cached pretrained weights for timm model "
                                            "'vit_tiny_patch16_224'.*hf download timm/"):
        PatchEncoder("vit_tiny_patch16_224", pretrained=True)
    with caplog.at_level(logging.WARNING, logger="omnimask.image"):
        enc = PatchEncoder("vit_tiny_patch16_224", pretrained="if_cached")
    assert not enc.pretrained and "random initialisation" in caplog.text
    with pytest.raises(OmnimaskError, match="pretrained must be"):
        PatchEncoder("vit_tiny_patch16_224", pretrained="yes")


def test_inputs_are_normalised_with_the_backbones_own_statistics():
    vit = PatchEncoder("vit_tiny_patch16_224", image_size=64, patch_size=8)
    want = timm.create_model("vit_tiny_patch16_224", pretrained=False).pretrained_cfg
    assert vit.mean.flatten().tolist() == pytest.approx(list(want["mean"]))
    assert vit.std.flatten().tolist() == pytest.approx(list(want["std"]))
    # ViT-tiny's weights were trained with mean = std = 0.5, not ImageNet's statistics
    assert vit.mean.flatten().tolist() == pytest.approx([0.5, 0.5, 0.5])
    conv = PatchEncoder("convnext_atto", image_size=64, patch_size=8)
    assert conv.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert "mean" not in vit.state_dict()  # not part of the weights


def test_pretrained_from_cache_loads_those_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    name = "vit_tiny_patch16_224"
    hub = timm.models.get_pretrained_cfg(name).hf_hub_id
    snap = tmp_path / f"models--{hub.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / f"models--{hub.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / f"models--{hub.replace('/', '--')}" / "refs" / "main").write_text("abc123")
    torch.manual_seed(5)
    src = timm.create_model(name, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snap / "model.safetensors"))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    enc = PatchEncoder(name, image_size=224, patch_size=None, pretrained=True)
    assert enc.pretrained
    assert torch.equal(enc.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_unknown_model():
    with pytest.raises(OmnimaskError, match="unknown timm model 'no_such_net'"):
        PatchEncoder("no_such_net")
