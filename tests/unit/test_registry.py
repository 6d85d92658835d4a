import pytest
import torch

from omnimask.config import DataConfig
from omnimask.errors import OmnimaskError
from omnimask.registry import PROCESSORS, Registry
from omnimask.train.data.schema import decode_sample
from omnimask.train.data.shapesworld import make_sample


def test_unknown_name_lists_known_and_duplicates_fail():
    r = Registry("widget")
    r.register("a")(int)
    with pytest.raises(OmnimaskError, match="unknown widget 'b'; known: a"):
        r.get("b")
    with pytest.raises(ValueError, match="twice"):
        r.register("a")(float)


@pytest.mark.parametrize("name", PROCESSORS.names())
def test_every_processor_on_a_shapesworld_sample(name):
    """Each registered processor declares its keys and turns a real sample into fields."""
    factory = PROCESSORS.get(name)
    assert factory.keys, f"processor {name} declares no keys"
    sample = make_sample(1, "train", 0, speech="speech.flac" in factory.keys)
    decoded = decode_sample(sample, factory.keys)
    out = factory(DataConfig())(decoded)
    assert out and all(isinstance(k, str) for k in out)
    for v in out.values():
        if isinstance(v, torch.Tensor):
            assert v.numel() > 0


def test_image_processor_resizes_when_asked():
    sample = make_sample(1, "train", 0, speech=False)
    decoded = decode_sample(sample, ("image.png", "seg.png", "inst.png"))
    img = PROCESSORS.get("image")(DataConfig(image_size=32))(decoded)["image"]
    masks = PROCESSORS.get("masks")(DataConfig(image_size=32))(decoded)
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
    assert masks["seg"].shape == (32, 32)
    # nearest resize keeps class ids: no new values appear
    assert set(masks["seg"].unique().tolist()) <= set(decoded["seg.png"].unique().tolist())
