"""Damaged shards: the reader skips exactly the broken samples, counts and names them."""

from __future__ import annotations

import io
import shutil
import tarfile

import pytest

from omnimask.config import DataConfig
from omnimask.errors import DataError
from omnimask.train.data.inspect import inspect_shards
from omnimask.train.data.pipeline import ShardLoader
from omnimask.train.data.shapesworld import generate_shards
from omnimask.train.data.tario import RawSample, iter_samples

ALL = ["image", "masks", "text", "qa", "refs", "meta", "speech"]
N = 12


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    generate_shards(d, N, seed=11, shard_size=N, speech=True, workers=1, progress=False)
    return d


def _members(path):
    with tarfile.open(path) as t:
        return {m.name: (m.offset, m.offset_data, m.size) for m in t.getmembers()}


def _copy(clean, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(clean, d)
    path = d / "train-000000.tar"
    return d, path, bytearray(path.read_bytes()), _members(path)


def _key(i):
    return f"train-{i:08d}"


def _read(d, workers=0):
    cfg = DataConfig(shards=[str(d / "*.tar")], processors=ALL, batch_size=4,
                     num_workers=workers, shuffle_buffer=5)
    loader = ShardLoader(cfg, rank=0, world_size=1)
    keys = [k for b in loader for k in b["__key__"]]
    return keys, loader


def _flip(buf, members, name, where=0.5):
    _, data, size = members[name]
    buf[data + int(size * where)] ^= 0x5A


@pytest.mark.parametrize("member,kind", [("image.png", "corrupt"), ("speech.flac", "corrupt"),
                                          ("seg.png", "corrupt"), ("meta.json", "corrupt")])
def test_flipped_byte_in_one_member(clean, tmp_path, member, kind):
    d, path, buf, m = _copy(clean, tmp_path)
    if member == "meta.json":
        _, data, _ = m[f"{_key(7)}.{member}"]
        buf[data] = ord("x")  # JSON no longer parses
    else:
        _flip(buf, m, f"{_key(7)}.{member}")
    path.write_bytes(buf)
    keys, loader = _read(d)
    assert sorted(keys) == [_key(i) for i in range(N) if i != 7]
    st = loader.stats()
    assert st["bad"] == 1 and st["bad_by_kind"] == {kind: 1} and st["lost"] == 0
    (rec,) = [r for r in loader.records if r["key"]]
    assert rec["key"] == _key(7) and rec["shard"].endswith("train-000000.tar")
    assert member in rec["reason"]


def test_many_faults_in_one_shard_workers_and_inspect_agree(clean, tmp_path):
    d, path, buf, m = _copy(clean, tmp_path)
    _flip(buf, m, f"{_key(3)}.image.png")
    _flip(buf, m, f"{_key(5)}.speech.flac", 0.7)
    qa_off = m[f"{_key(9)}.qa.json"][1]
    buf[qa_off] = ord("}")
    hdr = m[f"{_key(2)}.seg.png"][0]
    buf[hdr + 10] ^= 0x01  # damaged header: checksum fails, the reader resyncs
    path.write_bytes(buf)
    bad = {_key(i) for i in (2, 3, 5, 9)}
    for workers in (0, 2):
        keys, loader = _read(d, workers)
        assert sorted(keys) == sorted({_key(i) for i in range(N)} - bad), workers
        st = loader.stats()
        assert st["bad"] == 4 and st["bad_by_kind"] == {"corrupt": 3, "missing_key": 1}
        assert {r["key"] for r in loader.records if r["key"]} == bad
        assert any("damaged tar header" in r["reason"] for r in loader.records)
    rep = inspect_shards([str(path)], progress=False)
    assert {b["key"] for b in rep["bad_samples"]} == bad and rep["bad"] == 4
    assert any("SHA-256" in p["problem"] for p in rep["problems"])


def test_truncated_shard(clean, tmp_path):
    d, path, buf, m = _copy(clean, tmp_path)
    _, data, size = m[f"{_key(9)}.image.png"]
    path.write_bytes(bytes(buf[: data + size // 2]))  # cut inside sample 9
    keys, loader = _read(d)
    assert sorted(keys) == [_key(i) for i in range(9)]
    st = loader.stats()
    assert st["bad_by_kind"] == {"truncated": 1} and st["lost"] == N - 10
    assert [r["key"] for r in loader.records if r["key"]] == [_key(9)]
    rep = inspect_shards([str(path)], progress=False)
    assert rep["lost"] == N - 10 and any("truncated" in p["problem"] for p in rep["problems"])


def test_cut_exactly_between_samples_loses_only_what_is_missing(clean, tmp_path):
    d, path, buf, m = _copy(clean, tmp_path)
    path.write_bytes(bytes(buf[: m[f"{_key(6)}.caption.txt"][0]]))  # before sample 6
    keys, loader = _read(d)
    assert sorted(keys) == [_key(i) for i in range(6)]
    assert loader.stats()["bad"] == 0 and loader.stats()["lost"] == N - 6


def test_sample_missing_a_key(clean, tmp_path):
    d = tmp_path / "missing"
    d.mkdir()
    src = clean / "train-000000.tar"
    out = io.BytesIO()
    with tarfile.open(src) as t, tarfile.open(fileobj=out, mode="w") as w:
        for mem in t.getmembers():
            if mem.name != f"{_key(4)}.image.png":
                w.addfile(mem, t.extractfile(mem))
    (d / "train-000000.tar").write_bytes(out.getvalue())  # no manifest: keys from processors
    keys, loader = _read(d)
    assert sorted(keys) == [_key(i) for i in range(N) if i != 4]
    assert loader.stats()["bad_by_kind"] == {"missing_key": 1}
    assert "image.png" in [r for r in loader.records if r["key"]][0]["reason"]


def test_empty_and_garbage_files(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    keys, loader = _read(tmp_path)
    assert keys == [] and loader.stats()["bad"] == 0
    assert any("junk.tar" in r["shard"] for r in loader.records)


def test_missing_or_empty_shard_list_fails_before_work(tmp_path):
    with pytest.raises(DataError, match="empty"):
        ShardLoader(DataConfig(shards=[]), 0, 1)
    with pytest.raises(DataError, match="not found: .*nope.tar"):
        ShardLoader(DataConfig(shards=[str(tmp_path / "nope.tar")]), 0, 1)
    with pytest.raises(DataError, match="no shard matches"):
        ShardLoader(DataConfig(shards=[str(tmp_path / "*.tar")]), 0, 1)


def test_long_member_names_via_pax(tmp_path):
    long_key = "d/" + "x" * 150
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as w:
        for ext, data in (("caption.txt", b"hello"), ("cls", b"1")):
            info = tarfile.TarInfo(f"{long_key}.{ext}")
            info.size = len(data)
            w.addfile(info, io.BytesIO(data))
    got = [s for s in iter_samples(out.getvalue()) if isinstance(s, RawSample)]
    assert len(got) == 1 and got[0].key == long_key
    assert got[0].files == {"caption.txt": b"hello", "cls": b"1"}
