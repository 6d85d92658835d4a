"""ShapesWorld: determinism, and every label checked against meta.json independently."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from omnimask.train.data.schema import decode_flac, decode_png
from omnimask.train.data.shapesworld import NOVEL_COMBOS, SHAPES, generate_shards, make_sample
from omnimask.train.data.shards import read_manifest
from omnimask.train.data.tario import RawSample, iter_samples, open_shard

ALL_KEYS = {"image.png", "caption.txt", "qa.json", "seg.png", "inst.png", "refs.json",
            "speech.flac", "meta.json"}


def _samples(directory, split):
    for path in sorted(directory.glob(f"{split}-*.tar")):
        with open_shard(str(path)) as buf:
            for s in iter_samples(buf):
                assert isinstance(s, RawSample), s
                yield s.key, s.files


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_shards(a, 24, seed=7, shard_size=10, speech=True, workers=2, progress=False)
    generate_shards(b, 24, seed=7, shard_size=10, speech=True, workers=1, progress=False)
    generate_shards(c, 24, seed=8, shard_size=10, speech=True, workers=2, progress=False)
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert set(da) == {"manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"}
    assert da == db  # worker count does not change a byte
    assert all(da[k] != dc[k] for k in da)


def test_manifest_records_counts_and_versions(shapes_dir):
    m = read_manifest(shapes_dir)
    assert m["schema_version"] == 1
    tr = m["splits"]["train"]
    assert tr["num"] == 120 and [s["samples"] for s in tr["shards"]] == [40, 40, 40]
    assert tr["seed"] == 3 and tr["generator"] == "shapesworld" and tr["generator_version"]
    assert set(tr["keys"]) == ALL_KEYS
    assert m["splits"]["test-novel"]["num"] == 30


def _match(o, filt):
    return all(o[k] == v for k, v in filt.items())


def _holds(a, rel, b, margin):
    (ax, ay), (bx, by) = a["center"], b["center"]
    return {"left": bx - ax >= margin, "right": ax - bx >= margin,
            "above": by - ay >= margin, "below": ay - by >= margin}[rel]


def _answer(program, objs, margin):
    """Execute a question program against the objects of meta.json."""
    q = program["query"]
    if q in ("color", "shape", "size"):
        hits = [o for o in objs if _match(o, program["filter"])]
        assert len(hits) == 1, f"ambiguous question: {program}"
        return hits[0][q]
    if q == "count":
        return str(sum(_match(o, program["filter"]) for o in objs))
    if q == "exists":
        return "yes" if any(_match(o, program["filter"]) for o in objs) else "no"
    if q == "relation":
        s = [o for o in objs if _match(o, program["subject"])]
        t = [o for o in objs if _match(o, program["object"])]
        assert len(s) == 1 and len(t) == 1
        if _holds(s[0], program["relation"], t[0], margin):
            return "yes"
        opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
        assert _holds(s[0], opposite[program["relation"]], t[0], margin), "unclear relation asked"
        return "no"
    raise AssertionError(f"unknown query {q}")


def test_every_sample_is_consistent_with_its_meta(shapes_dir):
    n = 0
    types = Counter()
    for key, files in _samples(shapes_dir, "train"):
        n += 1
        assert set(files) == ALL_KEYS, key
        meta = json.loads(files["meta.json"])
        objs = meta["objects"]
        size = meta["image_size"]
        assert 1 <= len(objs) <= 4 and meta["split"] == "train" and meta["seed"] == 3
        image = decode_png(files["image.png"], rgb=True)
        seg, inst = decode_png(files["seg.png"]).numpy(), decode_png(files["inst.png"]).numpy()
        assert tuple(image.shape) == (3, size, size) and seg.shape == inst.shape == (size, size)
        # masks agree with meta: one instance id per object, seg = its shape class
        assert set(np.unique(inst)) - {0} == {o["id"] for o in objs}
        assert ((seg == 0) == (inst == 0)).all()
        for o in objs:
            pix = inst == o["id"]
            assert pix.sum() == o["area"] >= 8
            assert (seg[pix] == SHAPES.index(o["shape"]) + 1).all()
            ys, xs = np.nonzero(pix)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == o["bbox"]
            assert (o["shape"], o["color"]) not in NOVEL_COMBOS and not o["novel"]
            # the object's colour is really there: its pixels are near its rgb
            mean = image.numpy()[:, pix].mean(axis=1)
            assert np.abs(mean - np.array(o["rgb"])).max() < 40, (key, o)
        # every QA answer follows from meta
        for q in json.loads(files["qa.json"]):
            types[q["type"]] += 1
            assert q["answer"] == _answer(q["program"], objs, 0.15 * size), (key, q)
            for v in q["program"].get("filter", {}).values():
                assert v in q["question"]
        # referring expressions pick out exactly their instance
        for r in json.loads(files["refs.json"]):
            hits = [o for o in objs if _match(o, r["filter"])]
            if "position" not in r:
                assert [o["id"] for o in hits] == [r["instance"]]
            else:
                assert r["instance"] in [o["id"] for o in hits]
        # every caption names every object (with multiplicity)
        names = Counter(f"{o['size']} {o['color']} {o['shape']}" for o in objs)
        for cap in files["caption.txt"].decode().splitlines():
            for phrase, k in names.items():
                assert cap.count(phrase) >= k, (cap, phrase)
        # speech: 16 kHz, non-silent, as long as a spoken caption
        audio, sr = decode_flac(files["speech.flac"])
        assert sr == 16000 and 1.0 < len(audio) / sr < 20
        assert np.sqrt(np.mean(audio ** 2)) > 0.01
        assert meta["speech"]["text"] in files["caption.txt"].decode().splitlines()
    assert n == 120
    assert set(types) == {"color", "shape", "size", "count", "exists", "relation"}


def test_test_novel_holds_only_unseen_pairs(shapes_dir):
    seen_in_train = {(o["shape"], o["color"]) for _, f in _samples(shapes_dir, "train")
                     for o in json.loads(f["meta.json"])["objects"]}
    assert not seen_in_train & NOVEL_COMBOS
    for _, f in _samples(shapes_dir, "test-novel"):
        objs = json.loads(f["meta.json"])["objects"]
        assert any((o["shape"], o["color"]) in NOVEL_COMBOS and o["novel"] for o in objs)


def test_answers_are_balanced_enough(shapes_dir):
    """Yes/no questions are not all one answer; counts span several values."""
    ans = {t: Counter() for t in ("exists", "relation", "count")}
    for _, f in _samples(shapes_dir, "train"):
        for q in json.loads(f["qa.json"]):
            if q["type"] in ans:
                ans[q["type"]][q["answer"]] += 1
    for t in ("exists", "relation"):
        yes, no = ans[t]["yes"], ans[t]["no"]
        assert min(yes, no) / (yes + no) > 0.25, (t, ans[t])
    assert len(ans["count"]) >= 3


def test_make_sample_rejects_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        make_sample(0, "dev", 0)


def test_question_rounds_add_distinct_questions_and_keep_the_rest():
    """More rounds: round 1's questions first, then new ones (no repeated text), each
    answered correctly by its program; every other member byte-identical."""
    more_per_image = []
    for i in range(12):
        one = make_sample(4, "train", i, speech=False)
        four = make_sample(4, "train", i, speech=False, question_rounds=4)
        assert {k: v for k, v in one.items() if k != "qa.json"} == {
            k: v for k, v in four.items() if k != "qa.json"}
        q1, q4 = json.loads(one["qa.json"]), json.loads(four["qa.json"])
        assert q4[:len(q1)] == q1
        assert len({q["question"] for q in q4}) == len(q4)
        meta = json.loads(four["meta.json"])
        for q in q4:
            assert _answer(q["program"], meta["objects"], 0.15 * meta["image_size"]) == q["answer"]
        more_per_image.append(len(q4) - len(q1))
    assert sum(more_per_image) >= 2 * 12  # several new questions per image on average
    with pytest.raises(ValueError, match="question_rounds"):
        generate_shards("unused", 1, question_rounds=0)


def test_questions_name_the_instances_their_programs_look_at(shapes_dir):
    """``grounding``: one list of instance ids per role of the program, recomputed here
    from meta.json (relation: subject, object; count and exists: every match)."""
    kinds = Counter()
    for _, files in _samples(shapes_dir, "train"):
        objs = json.loads(files["meta.json"])["objects"]
        for q in json.loads(files["qa.json"]):
            p = q["program"]
            roles = ([p["subject"], p["object"]] if p["query"] == "relation" else [p["filter"]])
            want = [[o["id"] for o in objs if _match(o, f)] for f in roles]
            assert q["grounding"] == want, q
            if p["query"] in ("color", "shape", "size", "relation"):
                assert all(len(r) == 1 for r in want)
            kinds[p["query"]] += 1
    assert len(kinds) == 6
