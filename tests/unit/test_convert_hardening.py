"""Shard writers and converters under hostile or broken input: nothing written, read or
deleted outside the folders the user named, no traceback, nothing lost silently."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

import omnimask.train.data.convert as convert
import omnimask.train.data.shards as shards
from omnimask.cli import main
from omnimask.errors import DataError
from omnimask.registry import CONVERTERS
from omnimask.train.data.shards import read_manifest
from omnimask.train.data.tario import RawSample, iter_samples, open_shard


def _png(path, seed=0, size=16):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _tree(d):
    """Every file under d (relative path -> SHA-256): the whole state of an output folder."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _captions(out):
    caps = []
    for p in sorted(out.glob("*.tar")):
        with open_shard(str(p)) as buf:
            for s in iter_samples(buf):
                assert isinstance(s, RawSample)
                caps.append(s.files["caption.txt"].decode())
    return caps


@pytest.fixture
def imgs(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        _png(d / f"p{i}.png", i)
    return d


def _folder(imgs, table, out, **kw):
    return CONVERTERS.create("folder", images=str(imgs), captions=str(table), out=str(out),
                             progress=False, **kw)


def _good_table(tmp_path):
    t = tmp_path / "good.csv"
    t.write_text("image,caption\np0.png,a\np1.png,b\np2.png,c\n")
    return t


# -- writes and deletes outside --out -------------------------------------------------------
def test_split_that_is_a_path_writes_and_deletes_nothing_outside_out(tmp_path, imgs, capsys):
    base = tmp_path / "base"
    out = base / "o"
    out.mkdir(parents=True)
    victim = base / "victim-000005.tar"  # the old clean-up globbed o/../victim-NNNNNN.tar
    victim.write_bytes(b"precious")
    before = sorted(p.name for p in base.iterdir())
    rc = main(["data", "convert", "folder", "--images", str(imgs), "--captions",
               str(_good_table(tmp_path)), "--out", str(out), "--split", "../victim", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "--split" in err and "'../victim'" in err and len(err.splitlines()) == 1
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in base.iterdir()) == before and not list(out.iterdir())
    for bad in ("", ".hidden", "a/b", "a.b", "/abs", "x" * 200):
        with pytest.raises(DataError, match="split"):
            _folder(imgs, _good_table(tmp_path), out, split=bad)


def test_clean_up_removes_only_what_the_manifest_lists(tmp_path, imgs):
    out = tmp_path / "o"
    _folder(imgs, _good_table(tmp_path), out, shard_size=1)
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-00000{i}.tar" for i in range(3)]
    # the user's own file that happens to match the shard pattern, and a manifest entry that
    # names a file outside the folder: neither may be deleted by a shorter run
    mine = out / "train-000007.tar"
    mine.write_bytes(b"mine")
    outside = tmp_path / "victim.tar"
    outside.write_bytes(b"precious")
    m = read_manifest(out)
    m["splits"]["train"]["shards"].append({"name": "../victim.tar", "samples": 1})
    (out / "manifest.json").write_text(json.dumps(m))
    e = _folder(imgs, _good_table(tmp_path), out, shard_size=3)
    assert [s["name"] for s in e["shards"]] == ["train-000000.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000007.tar"]
    assert mine.read_bytes() == b"mine" and outside.read_bytes() == b"precious"


def test_a_file_the_manifest_does_not_list_is_never_overwritten(tmp_path, imgs):
    out = tmp_path / "o"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"not ours")
    with pytest.raises(DataError, match=r"train-000000\.tar .*not listed"):
        _folder(imgs, _good_table(tmp_path), out)
    assert (out / "train-000000.tar").read_bytes() == b"not ours"
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]


def test_manifest_temp_file_that_is_a_symlink_is_not_followed(tmp_path, imgs):
    out = tmp_path / "o"
    out.mkdir()
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    (out / "manifest.json.tmp").symlink_to(target)  # the old temp name, planted in advance
    _folder(imgs, _good_table(tmp_path), out)
    assert target.read_text() == "precious" and read_manifest(out)["splits"]["train"]["num"] == 3


# -- reads outside --images ------------------------------------------------------------------
def test_table_rows_naming_files_outside_images_are_refused(tmp_path, imgs):
    secret = tmp_path / "secret.png"
    _png(secret, 9)
    (imgs / "link.png").symlink_to(secret)
    t = tmp_path / "caps.csv"
    t.write_text(f"image,caption\np0.png,fine\n../secret.png,up\n{secret},absolute\n"
                 "link.png,through a symlink\n")
    e = _folder(imgs, t, tmp_path / "o")
    assert e["num"] == 1 and e["skipped"] == 3
    assert _captions(tmp_path / "o") == ["fine"]
    items = read_manifest(tmp_path / "o")["splits"]["train"]["skipped_items"]
    assert {i["name"] for i in items} == {"../secret.png", str(secret), "link.png"}
    assert all("outside the images folder" in i["reason"] for i in items)


def test_coco_file_names_outside_images_are_refused(tmp_path, imgs):
    secret = tmp_path / "secret.png"
    _png(secret, 9)
    cap = {"images": [{"id": 1, "file_name": "p0.png"}, {"id": 2, "file_name": "../secret.png"},
                      {"id": 3, "file_name": str(secret)}],
           "annotations": [{"image_id": i, "caption": f"c{i}"} for i in (1, 2, 3)]}
    (tmp_path / "c.json").write_text(json.dumps(cap))
    e = CONVERTERS.create("coco", images=str(imgs), captions=str(tmp_path / "c.json"),
                          out=str(tmp_path / "o"), progress=False)
    assert e["num"] == 1 and e["skipped"] == 2 and _captions(tmp_path / "o") == ["c1"]
    reasons = [i["reason"] for i in e["skipped_items"]]
    assert len(reasons) == 2 and all("outside the images folder" in r for r in reasons)


# -- converters lose nothing silently --------------------------------------------------------
def test_unterminated_csv_quote_is_an_error_naming_the_line(tmp_path, imgs):
    t = tmp_path / "caps.csv"
    t.write_text('image,caption\np0.png,"a cat\np1.png,a dog\np2.png,x\n')
    with pytest.raises(DataError, match=r"caps\.csv:2: .*quote"):
        _folder(imgs, t, tmp_path / "o")
    # a stray quote closed further down swallows rows just the same
    t.write_text('image,caption\np0.png,"a cat\np1.png,a dog\np2.png,"x"\n')
    with pytest.raises(DataError, match=r"caps\.csv:2: .*quote"):
        _folder(imgs, t, tmp_path / "o")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_failed_run_keeps_the_previous_shards_and_manifest(tmp_path, imgs):
    out = tmp_path / "o"
    _folder(imgs, _good_table(tmp_path), out, shard_size=2)
    before = _tree(out)
    t = tmp_path / "gone.csv"
    t.write_text("image,caption\nmissing1.png,a\nmissing2.png,b\n")
    with pytest.raises(DataError, match="no sample could be converted"):
        _folder(imgs, t, out)
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_run_aborted_half_way_leaves_the_old_state(tmp_path, imgs, monkeypatch):
    out = tmp_path / "o"
    _folder(imgs, _good_table(tmp_path), out, shard_size=1)
    before = _tree(out)
    real = convert._image_png
    calls = []

    def dies_on_third(path, *args):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(convert, "_image_png", dies_on_third)
    t = tmp_path / "new.csv"
    t.write_text("image,caption\np0.png,new a\np1.png,new b\np2.png,new c\n")
    with pytest.raises(KeyboardInterrupt):
        _folder(imgs, t, out, shard_size=1)
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_failure_while_swapping_shards_in_restores_the_old_state(tmp_path, imgs, monkeypatch):
    out = tmp_path / "o"
    _folder(imgs, _good_table(tmp_path), out, shard_size=1)
    before = _tree(out)
    real = os.replace
    moved = []

    def fails_on_second_shard(src, dst):
        if str(dst).endswith(".tar") and os.path.dirname(str(dst)) == str(out):
            moved.append(dst)
            if len(moved) == 2:  # the second new shard moved in
                raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(shards.os, "replace", fails_on_second_shard)
    t = tmp_path / "new.csv"
    t.write_text("image,caption\np0.png,new a\np1.png,new b\np2.png,new c\n")
    with pytest.raises(OSError, match="No space"):
        _folder(imgs, t, out, shard_size=1)
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_run_killed_while_swapping_is_completed_by_the_next_run(tmp_path, imgs):
    """A SIGKILL between two renames leaves a committed staging folder; the next writer of
    that split finishes the swap, so shards and manifest agree again."""
    out = tmp_path / "o"
    old = _folder(imgs, _good_table(tmp_path), out, shard_size=1)
    new_table = tmp_path / "new.csv"
    new_table.write_text("image,caption\np0.png,new a\np1.png,new b\n")
    pid = os.fork()  # the child is killed between two renames; os._exit skips all clean-up
    if pid == 0:
        try:
            real, n = os.replace, []

            def dies(src, dst):
                if str(dst).endswith(".tar") and os.path.dirname(str(dst)) == str(out):
                    n.append(dst)
                    if len(n) == 2:
                        os._exit(9)
                return real(src, dst)

            os.replace = dies
            _folder(imgs, new_table, out, shard_size=1)
        finally:
            os._exit(3)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 9
    assert read_manifest(out)["splits"]["train"] == old  # killed before the manifest update
    # the next writer of the same folder and split rolls the interrupted swap forward first
    shards.finish_interrupted(out, "train")
    m = read_manifest(out)["splits"]["train"]
    assert m["num"] == 2 and [s["name"] for s in m["shards"]] == ["train-000000.tar",
                                                                  "train-000001.tar"]
    for s in m["shards"]:
        assert hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar",
                                                      "train-000001.tar"]
    assert _captions(out) == ["new a", "new b"]


def test_non_utf8_tables_are_one_line_errors(tmp_path, imgs, capsys):
    t = tmp_path / "caps.csv"
    t.write_bytes("image,caption\np0.png,caf\u00e9\n".encode("latin-1"))
    rc = main(["data", "convert", "folder", "--images", str(imgs), "--captions", str(t),
               "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "caps.csv" in err and "UTF-8" in err and len(err.splitlines()) == 1
    j = tmp_path / "caps.jsonl"
    j.write_bytes('{"image": "p0.png", "caption": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"caps\.jsonl.*UTF-8"):
        _folder(imgs, j, tmp_path / "o")


def test_short_and_long_csv_rows_are_bad_rows_not_truncated_captions(tmp_path, imgs):
    t = tmp_path / "caps.csv"
    t.write_text("image,caption\np0.png,fine\np1.png\np2.png,a cat, sitting\n")
    e = _folder(imgs, t, tmp_path / "o")
    assert e["num"] == 1 and e["skipped"] == 2 and _captions(tmp_path / "o") == ["fine"]
    reasons = {i["name"]: i["reason"] for i in e["skipped_items"]}
    assert "1 field" in reasons["caps.csv:3"] and "3 fields" in reasons["caps.csv:4"]


def test_huge_csv_field_is_a_one_line_error(tmp_path, imgs, capsys):
    t = tmp_path / "caps.csv"
    t.write_text("image,caption\np0.png," + "x" * 200_000 + "\n")
    rc = main(["data", "convert", "folder", "--images", str(imgs), "--captions", str(t),
               "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "caps.csv:2" in err and len(err.splitlines()) == 1


def test_jsonl_rows_of_the_wrong_type(tmp_path, imgs):
    j = tmp_path / "caps.jsonl"
    j.write_text('"p0.png image"\n')
    with pytest.raises(DataError, match=r"caps\.jsonl:1: .*JSON object"):
        _folder(imgs, j, tmp_path / "o")
    rows = [{"image": "p0.png", "captions": "a cat"},  # a string, not a list
            {"image": "p1.png", "caption": None},
            {"image": "p2.png", "captions": ["ok", None, 5]},
            {"image": 7, "caption": "x"}]
    j.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    e = _folder(imgs, j, tmp_path / "o")
    assert e["num"] == 1 and _captions(tmp_path / "o") == ["ok"]
    assert e["skipped"] == 5
    reasons = " | ".join(f"{i['name']}: {i['reason']}" for i in e["skipped_items"])
    assert "caps.jsonl:1" in reasons and "list" in reasons and "None" not in _captions(tmp_path / "o")


def test_coco_mixed_id_types_and_null_captions(tmp_path, imgs):
    cap = {"images": [{"id": 1, "file_name": "p0.png"}, {"id": "2", "file_name": "p1.png"}],
           "annotations": [{"image_id": 1, "caption": "c1"}]}
    (tmp_path / "c.json").write_text(json.dumps(cap))
    with pytest.raises(DataError, match=r"c\.json: images\[1\]\.id .*integer"):
        CONVERTERS.create("coco", images=str(imgs), captions=str(tmp_path / "c.json"),
                          out=str(tmp_path / "o"), progress=False)
    cap = {"images": [{"id": 1, "file_name": "p0.png"}, {"id": 2, "file_name": "p1.png"}],
           "annotations": [{"image_id": 1, "caption": None}, {"image_id": 1, "caption": "c1"},
                           {"image_id": 2, "caption": None}, {"image_id": 9, "caption": "c9"}]}
    (tmp_path / "c.json").write_text(json.dumps(cap))
    e = CONVERTERS.create("coco", images=str(imgs), captions=str(tmp_path / "c.json"),
                          out=str(tmp_path / "o"), progress=False)
    assert e["num"] == 1 and _captions(tmp_path / "o") == ["c1"]
    # two null captions, a caption of an image not in 'images', an image left without one
    assert e["skipped"] == 4
    assert all(i["reason"] for i in e["skipped_items"])


def test_skipped_rows_are_listed_by_name_and_capped(tmp_path, imgs):
    t = tmp_path / "caps.csv"
    t.write_text("image,caption\np0.png,ok\n" + "".join(f"m{i:04d}.png,x\n" for i in range(1005)))
    e = _folder(imgs, t, tmp_path / "o")
    assert e["num"] == 1 and e["skipped"] == 1005
    m = read_manifest(tmp_path / "o")["splits"]["train"]
    assert m["skipped"] == 1005 and len(m["skipped_items"]) == 1000
    assert m["skipped_items"][0]["name"] == "m0000.png"
    assert "cannot read image" in m["skipped_items"][0]["reason"]


def test_bad_sizes_and_an_out_that_is_a_file_are_one_line_errors(tmp_path, imgs, capsys):
    t = _good_table(tmp_path)
    base = ["data", "convert", "folder", "--images", str(imgs), "--captions", str(t), "-q"]
    for extra, msg in ((["--out", str(tmp_path / "o"), "--shard-size", "0"], "--shard-size must be >= 1"),
                       (["--out", str(tmp_path / "o"), "--max-image-size", "-3"],
                        "--max-image-size must be >= 1"),
                       (["--out", str(t)], "is a file, not a")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.splitlines()) == 1
    assert t.read_text().startswith("image,caption")


def test_coco_duplicate_image_ids_are_an_error(tmp_path, imgs):
    cap = {"images": [{"id": 1, "file_name": "p0.png"}, {"id": 1, "file_name": "p1.png"}],
           "annotations": [{"image_id": 1, "caption": "c1"}]}
    (tmp_path / "c.json").write_text(json.dumps(cap))
    with pytest.raises(DataError, match=r"images\[1\]\.id 1 appears twice"):
        CONVERTERS.create("coco", images=str(imgs), captions=str(tmp_path / "c.json"),
                          out=str(tmp_path / "o"), progress=False)


def test_shapes_all_splits_then_a_smaller_rerun(tmp_path):
    out = tmp_path / "d"
    argv = ["data", "shapes", "--out", str(out), "--split", "all", "--no-speech", "--workers",
            "1", "--shard-size", "1", "-q"]
    assert main(argv + ["--num", "2"]) == 0
    m = read_manifest(out)["splits"]
    assert sorted(m) == ["test", "test-novel", "train", "val"] and m["val"]["num"] == 2
    assert main(argv + ["--num", "1", "--split", "val"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "val-000001.tar" not in names and "train-000001.tar" in names
    assert names == sorted(["manifest.json"] + [s["name"] for e in read_manifest(out)["splits"].values()
                                                for s in e["shards"]])
