"""Fitting images to the model's square (crop, pad, stretch), and the converters that store
images that way: images-only folders and ImageFolder class layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from omnimask.config import DataConfig
from omnimask.errors import DataError
from omnimask.modalities.image.processor import Fit, fit_image
from omnimask.registry import CONVERTERS, PROCESSORS
from omnimask.train.data.pipeline import ShardLoader


def _bands(h: int, w: int) -> torch.Tensor:
    """[3, h, w] uint8: red left quarter, green middle half, blue right quarter."""
    x = torch.zeros(3, h, w, dtype=torch.uint8)
    q = w // 4
    x[0, :, :q], x[1, :, q:w - q], x[2, :, w - q:] = 255, 255, 255
    return x


def test_crop_keeps_the_centre_and_the_aspect():
    out = fit_image(_bands(40, 80), 40, "crop")  # the middle 40 columns: all green
    assert out.shape == (3, 40, 40) and out.dtype == torch.uint8
    assert (out[1] == 255).all() and (out[0] == 0).all() and (out[2] == 0).all()
    tall = fit_image(_bands(40, 80).transpose(1, 2), 40, "crop")  # bands across the rows
    assert (tall[1] == 255).all() and (tall[0] == 0).all()


def test_pad_keeps_everything_on_black_borders():
    x = _bands(40, 80)
    out = fit_image(x, 40, "pad")  # scaled to 20 x 40, 10 black rows above and below
    assert out.shape == (3, 40, 40)
    assert (out[:, :10] == 0).all() and (out[:, 30:] == 0).all()
    ref = torch.nn.functional.interpolate(x[None].float(), size=(20, 40), mode="bilinear",
                                          antialias=True, align_corners=False).round()[0]
    assert torch.equal(out[:, 10:30], ref.to(torch.uint8))
    geo = Fit(40, 80, 40, "pad")
    assert (geo.scaled, geo.offset) == ((20, 40), (10, 0))
    assert geo.point(0, 0) == (0.0, 0.25) and geo.point(80, 40) == (1.0, 0.75)


def test_stretch_is_the_plain_resize_and_square_images_are_untouched():
    x = _bands(40, 80)
    ref = torch.nn.functional.interpolate(x[None].float(), size=(32, 32), mode="bilinear",
                                          antialias=True, align_corners=False).round()[0]
    assert torch.equal(fit_image(x, 32, "stretch"), ref.to(torch.uint8))
    sq = _bands(32, 32)
    assert all(fit_image(sq, 32, f) is sq for f in ("crop", "pad", "stretch"))
    with pytest.raises(ValueError, match="crop, pad, stretch"):
        fit_image(x, 32, "squash")


def test_masks_follow_the_image_geometry_with_their_ids():
    seg = torch.zeros(40, 80, dtype=torch.uint8)
    seg[10:30, 36:52] = 3  # an object right of centre, inside the centre square
    for fit in ("crop", "pad", "stretch"):
        m = fit_image(seg, 32, fit, "nearest")
        assert set(m.unique().tolist()) == {0, 3}
        # the object's centre lands where Fit.point says the source pixel goes
        ys, xs = torch.nonzero(m == 3, as_tuple=True)
        px, py = Fit(40, 80, 32, fit).point(44, 20)
        assert abs(xs.float().mean() + 0.5 - px * 32) < 1.0
        assert abs(ys.float().mean() + 0.5 - py * 32) < 1.0


def test_unfit_inverts_pad_to_the_source_size():
    x = torch.linspace(0, 1, 60)[None, :].expand(30, 60).contiguous()  # a smooth ramp
    geo = Fit(30, 60, 32, "pad")
    square = torch.zeros(32, 32)
    (rh, rw), (top, left) = geo.scaled, geo.offset
    square[top:top + rh, left:left + rw] = torch.nn.functional.interpolate(
        x[None, None], size=(rh, rw), mode="bilinear", align_corners=False)[0, 0]
    back = geo.unfit(square)
    assert back.shape == (30, 60) and (back - x).abs().max() < 0.03
    with pytest.raises(ValueError, match="cannot be undone"):
        Fit(30, 60, 32, "crop").unfit(square)


def test_processors_fit_by_data_image_fit():
    d = {"image.png": _bands(40, 80), "seg.png": torch.ones(40, 80, dtype=torch.uint8),
         "inst.png": torch.ones(40, 80, dtype=torch.uint8)}
    crop = PROCESSORS.get("image")(DataConfig(image_size=40))(d)["image"]
    pad = PROCESSORS.get("image")(DataConfig(image_size=40, image_fit="pad"))(d)["image"]
    assert (crop[1] == 255).all() and (pad[:, :10] == 0).all()
    masks = PROCESSORS.get("masks")(DataConfig(image_size=40, image_fit="pad"))(d)
    assert (masks["seg"][:10] == 0).all() and (masks["seg"][10:30] == 1).all()
    with pytest.raises(ValueError, match="image_fit must be crop, pad or stretch"):
        DataConfig(image_fit="squash")


@pytest.fixture
def photos(tmp_path):
    """Images of every mode and shape a real folder holds, a corrupt one and a text file."""
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "puppies").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(_bands(60, 120).permute(1, 2, 0).numpy()).save(root / "cats" / "wide.png")
    Image.fromarray(rng.integers(0, 255, (90, 30), dtype=np.uint8), "L").save(
        root / "cats" / "tall_grey.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA").save(
        root / "dogs" / "small_rgba.png")
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).convert("P").save(
        root / "dogs" / "puppies" / "palette.gif")
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored")
    Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(root / "loose.png")
    return root


def _manifest_entry(out, split="train"):
    return json.loads((out / "manifest.json").read_text())["splits"][split]


def _batch(out, processors):
    cfg = DataConfig(shards=[str(out / "*.tar")], processors=processors, batch_size=16,
                     shuffle_buffer=0)
    (b,) = list(ShardLoader(cfg, 0, 1))
    return b


def test_images_route_fits_every_mode_and_lists_what_it_skipped(photos, tmp_path):
    out = tmp_path / "shards"
    e = CONVERTERS.create("images", images=str(photos), out=str(out), image_size=32, fit="pad",
                          progress=False)
    assert e["num"] == 5 and e["skipped"] == 2  # every image; the text file and the corrupt one
    entry = _manifest_entry(out)
    assert (entry["image_size"], entry["image_fit"], entry["keys"]) == (
        32, "pad", ["image.png", "meta.json"])
    skipped = {s["name"]: s["reason"] for s in entry["skipped_items"]}
    assert set(skipped) == {"dogs/notes.txt", "dogs/broken.jpg"}
    assert "not an image file" in skipped["dogs/notes.txt"]
    assert "cannot read image" in skipped["dogs/broken.jpg"]
    b = _batch(out, ["image", "meta"])
    assert b["image"].shape == (5, 3, 32, 32)
    meta = {m["file_name"]: m for m in b["meta"]}
    assert set(meta) == {"cats/wide.png", "cats/tall_grey.jpg", "dogs/small_rgba.png",
                         "dogs/puppies/palette.gif", "loose.png"}
    wide = meta["cats/wide.png"]
    assert (wide["width"], wide["source_width"], wide["source_height"]) == (32, 120, 60)
    k = [m["file_name"] for m in b["meta"]].index("cats/wide.png")
    assert (b["image"][k][:, :8] == 0).all()  # padded: black rows above the 16-row band


def test_imagefolder_route_numbers_classes_and_writes_captions(photos, tmp_path):
    out = tmp_path / "shards"
    e = CONVERTERS.create("imagefolder", images=str(photos), out=str(out), image_size=24,
                          progress=False)
    entry = _manifest_entry(out)
    assert entry["classes"] == ["cats", "dogs"] and entry["image_fit"] == "crop"
    assert e["num"] == 4 and {s["name"] for s in entry["skipped_items"]} == {
        "loose.png", "dogs/notes.txt", "dogs/broken.jpg"}
    b = _batch(out, ["image", "text", "meta"])
    got = {m["file_name"]: (m["label"], m["class_name"], c[0])
           for m, c in zip(b["meta"], b["captions"])}
    assert got["cats/wide.png"] == (0, "cats", "a photo of a cats.")
    assert got["dogs/puppies/palette.gif"] == (1, "dogs", "a photo of a dogs.")
    k = [m["file_name"] for m in b["meta"]].index("cats/wide.png")
    assert (b["image"][k][1, :, 1:-1] == 255).all()  # the centre crop of the bands: green
    assert (b["image"][k][0, :, 1:-1] == 0).all()  # (the edge columns blend antialiased)
    no_caps = CONVERTERS.create("imagefolder", images=str(photos), out=str(tmp_path / "o2"),
                                caption_template="", progress=False)
    assert "caption.txt" not in no_caps["keys"]
    with pytest.raises(DataError, match="no {} for the class name"):
        CONVERTERS.create("imagefolder", images=str(photos), out=str(tmp_path / "o3"),
                          caption_template="a photo")
    with pytest.raises(DataError, match="no class folders"):
        CONVERTERS.create("imagefolder", images=str(photos / "cats"), out=str(tmp_path / "o4"))
    with pytest.raises(DataError, match="image fit must be one of crop, pad, stretch"):
        CONVERTERS.create("images", images=str(photos), out=str(tmp_path / "o5"),
                          image_size=8, fit="squash")


def test_cli_converts_folders_and_says_what_it_skipped(photos, tmp_path, capsys):
    from omnimask.cli import main

    out = tmp_path / "cli"
    assert main(["data", "convert", "imagefolder", "--images", str(photos), "--out", str(out),
                 "--image-size", "16", "--fit", "stretch", "--caption-template",
                 "an image of {}", "-q"]) == 0
    said = capsys.readouterr().out
    assert "4 samples" in said and "3 input rows or images skipped" in said
    entry = _manifest_entry(out)
    assert (entry["image_fit"], entry["caption_template"]) == ("stretch", "an image of {}")
    assert main(["data", "convert", "images", "--images", str(photos), "--out", str(out),
                 "--split", "unlabelled", "-q"]) == 0
    assert _manifest_entry(out, "unlabelled")["image_fit"] is None  # stored at their size
    assert main(["data", "convert", "images", "--images", str(photos), "--out", str(out),
                 "--image-size", "0"]) == 2  # a usage error
    assert "--image-size must be >= 1" in capsys.readouterr().err
