"""ShapesWorld caption scoring (train/evaluate.py: object_match)."""
from omnimask.train.evaluate import caption_scores, object_match


def test_pairs_bind_colour_to_the_next_shape():
    refs = ["a large red square and a small blue circle left of the square"]
    m = object_match("a small blue circle, a red square", refs)
    assert m == {"precision": 1.0, "recall": 1.0, "names_all": True,
                 "colour_precision": 1.0, "shape_precision": 1.0}
    # colours swapped: no pair is right, yet every colour and every shape is one the image has
    m = object_match("a blue square and a red circle", refs)
    assert (m["precision"], m["recall"], m["names_all"]) == (0.0, 0.0, False)
    assert (m["colour_precision"], m["shape_precision"]) == (1.0, 1.0)


def test_partial_and_plural_and_empty():
    refs = ["two green stars and a small red cross"]
    m = object_match("green stars, a yellow cross and a green hexagon", refs)
    # pairs: (green, star) right; (yellow, cross) right shape only; (green, hexagon) colour only
    assert m["precision"] == round(1 / 3, 3) and m["recall"] == 0.5 and not m["names_all"]
    assert m["colour_precision"] == round(2 / 3, 3) and m["shape_precision"] == round(2 / 3, 3)
    assert object_match("", refs)["precision"] == 0.0
    assert object_match("a red cross", [])["recall"] == 0.0


def test_a_repeated_object_is_precise_but_recalls_one_pair():
    refs = ["a large red square and a small blue circle"]
    m = object_match("a red square, a large red square and a small red square", refs)
    assert (m["precision"], m["recall"], m["names_all"]) == (1.0, 0.5, False)


def test_score_line_puts_each_score_beside_its_chance():
    s = {"captions_scored": 32, "captions_naming_every_object": 3,
         "chance_captions_naming_every_object": 0}
    for i, k in enumerate(("colour", "shape", "object")):
        s[f"caption_{k}_precision"], s[f"chance_caption_{k}_precision"] = 0.5 + i / 10, i / 10
    line = caption_scores(s)
    assert line.startswith("CM3 captions of 32 val images")
    for part in ("right colour 0.500 (chance 0.000)", "right shape 0.600 (chance 0.100)",
                 "right (colour, shape) 0.700 (chance 0.200)", "every object: 3 (chance 0)"):
        assert part in line


def test_object_scores_are_for_shapesworld_captions_only():
    from omnimask.train.evaluate import caption_scores, shapesworld_captions

    assert shapesworld_captions(["a dog on a sofa", "a small red circle left of it"])
    assert not shapesworld_captions(["a dog on a sofa", "two people at a table"])
    line = caption_scores({"shapesworld": False, "captions_scored": 3})
    assert "no object scores" in line and "0.000" not in line
