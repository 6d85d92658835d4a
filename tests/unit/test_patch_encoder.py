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


def test_pretrained_without_cache_falls_back(caplog, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="omnimask.image"):
        enc = PatchEncoder("vit_tiny_patch16_224", pretrained=True)
    assert not enc.pretrained and "random initialisation" in caplog.text


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
