"""The ShapesWorld shape judge (train/data/shapesworld/judge.py) and the caption parser."""
import numpy as np
import pytest
import torch

from omnimask.errors import OmnimaskError
from omnimask.train.data.shapesworld.judge import (
    SHIPPED,
    components,
    count_scores,
    crop,
    judge_images,
    load_or_train,
    objects,
    rendered_batch,
    shape_scores,
    shipped_judge,
)
from omnimask.train.data.shapesworld.language import captions, named_count, named_objects
from omnimask.train.data.shapesworld.vocab import COLORS, SHAPES


def test_named_objects_bind_each_shape_to_the_colour_before_it():
    assert named_objects("a small red star and two large red crosses, the square") == {
        ("red", "star"), ("red", "cross")}
    assert named_objects("A blue circle left of the green hexagon.") == {
        ("blue", "circle"), ("green", "hexagon")}
    assert named_objects("three objects") == set()


def test_components_are_8_connected_and_objects_need_saturated_pixels():
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, 0, 0] = m[0, 1, 1] = True  # diagonal neighbours: one component
    m[0, 5:7, 5:7] = True  # a second one
    lab = components(m)[0]
    assert lab[0, 0] == lab[1, 1] != lab[5, 5] and lab[0, 1] == 0
    assert len(lab.unique()) == 3
    img = torch.full((1, 3, 64, 64), 120, dtype=torch.uint8)
    img[0, :, 4:12, 4:12] = torch.tensor(COLORS["blue"], dtype=torch.uint8)[:, None, None]
    img[0, :, 30:40, 30:40] = torch.tensor([150, 120, 110], dtype=torch.uint8)[:, None, None]
    found = objects(img)[0]  # the muted brown square is background
    assert len(found) == 1 and int(found[0][1].sum()) == 64
    c = crop(found[0][1])
    assert c.shape == (24, 24) and c.max() == 1 and c[0].max() == 0  # the margin is empty


def _flood_labels(mask: torch.Tensor) -> torch.Tensor:
    """Reference: every masked pixel takes the largest raster index (plus one) reachable
    through 8-neighbours, by propagating a 3x3 max until nothing changes."""
    b, h, w = mask.shape
    idx = torch.arange(1, h * w + 1, dtype=torch.float64).view(1, h, w).expand(b, h, w)
    lab = torch.where(mask, idx, torch.zeros((), dtype=torch.float64))
    while True:
        grown = torch.nn.functional.max_pool2d(lab[:, None], 3, 1, 1)[:, 0] * mask
        if torch.equal(grown, lab):
            return lab.long()
        lab = grown


@pytest.mark.parametrize("density", [0.1, 0.35, 0.6])
def test_components_equal_the_flood_fill_on_random_masks(density):
    gen = torch.Generator().manual_seed(int(density * 100))
    mask = torch.rand(6, 23, 31, generator=gen) < density
    mask[0] = False  # a picture without pixels
    assert torch.equal(components(mask), _flood_labels(mask))
    assert torch.equal(components(mask[2:3])[0], components(mask)[2])  # batch-independent


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    path = tmp_path_factory.mktemp("judge") / "judge.safetensors"
    model = load_or_train(path, progress=False, scenes=500, epochs=4)
    assert path.is_file() and not path.with_suffix(".tmp").exists()
    return model, path


def test_judge_names_the_shapes_of_rendered_scenes_and_rejects_swapped_captions(judge):
    model, _ = judge
    images, _, objs = rendered_batch(np.random.default_rng(99), 64)
    true = [", ".join(f"a {o.color} {o.shape}" for o in ob) for ob in objs]
    wrong = [", ".join(f"a {o.color} {SHAPES[(SHAPES.index(o.shape) + 1) % 6]}" for o in ob)
             for ob in objs]
    right, swapped = (shape_scores(judge_images(model, images, c)) for c in (true, wrong))
    assert right["colour_present"] > 0.95 and swapped["colour_present"] == right["colour_present"]
    # six shapes: chance ~0.19
    assert right["shape_hit"] > 0.6 and swapped["shape_hit"] < 0.2


def test_the_shipped_judge_loads_by_name_and_names_rendered_shapes():
    """The package's judge (no training, nothing written) on unseen rendered scenes: as the
    README states, ~0.94 of the objects' shapes against chance ~0.19."""
    assert shipped_judge().is_file()
    model = load_or_train(SHIPPED, progress=False)
    images, _, objs = rendered_batch(np.random.default_rng(123), 64)
    true = [", ".join(f"a {o.color} {o.shape}" for o in ob) for ob in objs]
    scores = shape_scores(judge_images(model, images, true))
    assert scores["shape_hit"] > 0.85 and scores["colour_present"] > 0.95, scores


def test_missing_colours_are_absent_and_reloading_gives_the_same_judge(judge):
    model, path = judge
    img = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)
    img[0, :, 20:44, 20:44] = torch.tensor(COLORS["red"], dtype=torch.uint8)[:, None, None]
    rows = {r["colour"]: r for r in judge_images(model, img, ["a blue star and a red square"])[0]}
    assert rows["blue"] == {"colour": "blue", "named": ["star"], "objects": 0, "shapes": []}
    assert rows["red"]["objects"] == 1 and rows["red"]["shapes"][0] in SHAPES
    again = load_or_train(path)
    x = torch.rand(3, 24, 24)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    broken = path.with_name("broken.safetensors")
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(OmnimaskError, match="broken.safetensors is unreadable"):
        load_or_train(broken)


def test_scores_count_objects_of_named_colours_and_their_chance():
    rows = [[{"colour": "red", "named": ["star"], "objects": 2, "shapes": ["star", "circle"]},
             {"colour": "blue", "named": ["circle", "cross"], "objects": 1, "shapes": ["cross"]}],
            [{"colour": "green", "named": ["square"], "objects": 0, "shapes": []}]]
    assert shape_scores(rows) == {"named": 3, "colour_present": 0.667, "objects": 3,
                                  "shape_hit": 0.667, "shape_chance": 0.222}
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        judge_images(None, torch.zeros(2, 3, 64, 64, dtype=torch.uint8), ["a red star"])


def test_named_count_is_the_scenes_object_count_in_every_caption_phrasing():
    rng = np.random.default_rng(7)
    _, _, objs = rendered_batch(rng, 40)
    for ob in objs:  # relational captions refer back ("... left of the red star")
        for cap in captions(ob, 64, rng):
            assert named_count(cap) == len(ob), cap
    assert named_count("three objects") == 0


def test_count_scores_compare_components_with_the_caption():
    img = torch.full((2, 3, 64, 64), 120, dtype=torch.uint8)
    for b, (y, x) in enumerate([(4, 4), (40, 40)]):
        img[b, :, y:y + 8, x:x + 8] = torch.tensor(COLORS["red"], dtype=torch.uint8)[:, None, None]
    img[0, :, 40:50, 40:50] = torch.tensor(COLORS["blue"], dtype=torch.uint8)[:, None, None]
    caps = ["a red square and a blue circle", "a red square and a blue circle"]
    assert count_scores(img, caps) == {"counted": 2, "count_hit": 0.5}  # the second has one
    assert count_scores(img, ["a red square", "no objects named"]) == {"counted": 1,
                                                                      "count_hit": 0.0}
