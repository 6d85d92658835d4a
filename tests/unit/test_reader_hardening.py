"""Hostile bytes for the shard readers: malformed tar headers, content that breaks the
schema's promises (sample rate, pixel count), and ``inspect --strict`` on broken datasets."""

from __future__ import annotations

import json
import shutil
import signal
import struct
import tarfile
import zlib
from contextlib import contextmanager

import numpy as np
import pytest

from omnimask.cli import main
from omnimask.config import DataConfig
from omnimask.errors import DataError
from omnimask.train.data.inspect import inspect_shards
from omnimask.train.data.pipeline import ShardLoader
from omnimask.train.data.schema import (
    PNG_SIGNATURE,
    SampleError,
    decode_sample,
    encode_flac,
)
from omnimask.train.data.shapesworld import generate_shards
from omnimask.train.data.tario import RawSample, TarProblem, iter_samples

ALL = ["image", "masks", "text", "qa", "refs", "meta", "speech"]


# -- helpers shared with test_reader_fuzz -------------------------------------------------------
class Spinning(Exception):
    """A read ran past its time guard (the reader looped instead of moving on)."""


@contextmanager
def time_guard(seconds: float = 5.0):
    """Raise :class:`Spinning` inside the guarded code if it runs longer than ``seconds``."""
    def fire(*_):
        raise Spinning(f"read still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def read_all(buf, seconds: float = 5.0, **kw) -> list:
    """Every item of ``iter_samples(buf)``, under a time and a step guard."""
    bound = len(buf) // 512 * 2 + 4  # at most a problem and a sample per block
    out = []
    with time_guard(seconds):
        for item in iter_samples(buf, **kw):
            out.append(item)
            assert len(out) <= bound, "the reader yields more items than the shard has blocks"
    return out


def fix_checksum(block: bytearray) -> bytearray:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return block


def header(name: bytes, size: int | bytes = 0, kind: bytes = b"0") -> bytearray:
    """One ustar header block with a valid checksum; ``size`` may be a raw 12-byte field."""
    b = bytearray(512)
    b[0:len(name)] = name
    b[100:108] = b"0000644\0"
    b[108:116] = b[116:124] = b"0000000\0"
    b[124:136] = size if isinstance(size, bytes) else b"%011o\0" % size
    b[136:148] = b"00000000000\0"
    b[156:157] = kind
    b[257:265] = b"ustar\x0000"
    return fix_checksum(b)


def member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    return bytes(header(name, len(data), kind)) + data + bytes(-len(data) % 512)


def end() -> bytes:
    return bytes(1024)


def pax_record(key: bytes, value: bytes) -> bytes:
    """``"<length> key=value\\n"``, the length counting its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return b"%d" % n + body


def keys_of(items) -> list[str]:
    return [s.key for s in items if isinstance(s, RawSample)]


def problems_of(items) -> list[TarProblem]:
    return [p for p in items if isinstance(p, TarProblem)]


# -- tar parsing: every length and field is bounded and validated ------------------------------
OK = member(b"ok.txt", b"fine") + member(b"ok.cls", b"1")


@pytest.mark.parametrize("kind,payload", [
    (b"x", b"0 path=a.txt\n"),  # a zero record length: the parser used to loop forever
    (b"x", b"-6 path=x\n"),  # a negative length walked backwards forever
    (b"x", b"no-space-here"),  # ValueError traceback
    (b"x", b"1z path=a.txt\n"),  # not a number: ValueError traceback
    (b"x", b"99 path=a.txt\n"),  # longer than the header's data
    (b"x", b"14 path=a.txtX"),  # no newline at the end of the record
    (b"x", b"12 pathatxt\n"),  # no '='
    (b"x", b"11 size=-5\n"),  # a size that is not a number
    (b"x", pax_record(b"path", b"p" * 4096 + b".txt")),  # longer than any path
    (b"L", b"q" * 5000 + b".txt"),  # GNU long name longer than any path
])
def test_malformed_extended_header_is_one_damaged_header(kind, payload):
    buf = member(b"././@Ext", payload, kind) + member(b"long.txt", b"data") + OK + end()
    items = read_all(buf)
    (p,) = problems_of(items)  # counted once
    assert "damaged" in p.reason and p.offset == 0
    # the member the header described has no trustworthy name: skipped; the rest is read
    assert keys_of(items) == ["ok"]
    assert items[-1].files == {"txt": b"fine", "cls": b"1"}


@pytest.mark.parametrize("size", [
    b"-1000\0      ",  # octal -512: the reader stood still at 100% CPU
    b"-2000\0      ",  # octal -1024: the reader walked backwards forever
    b"0o17\0       ",  # Python int() syntax, not tar's
    b"\xff" * 12,  # base-256 negative
    b"\x81" + bytes(11),  # base-256 with stray bits in the first byte
])
def test_negative_or_malformed_size_is_a_damaged_header(size):
    buf = member(b"a.txt", b"first") + bytes(header(b"b.txt", size)) + bytes(512) + OK + end()
    items = read_all(buf)
    assert keys_of(items) == ["a", "ok"]
    (p,) = problems_of(items)
    assert "damaged" in p.reason


def test_valid_pax_path_and_size_are_honoured():
    name = b"d/" + b"k" * 150 + b".txt"
    rec = pax_record(b"mtime", b"1.5") + pax_record(b"path", name)
    glob = member(b"pax_global_header", pax_record(b"comment", b"hi"), b"g")
    buf = glob + member(b"././@PaxHeader", rec, b"x") + member(b"short.txt", b"hello") + OK + end()
    items = read_all(buf)
    assert not problems_of(items)
    assert keys_of(items) == ["d/" + "k" * 150, "ok"] and items[0].files == {"txt": b"hello"}
    # a pax size replaces the header's (tar writes it there when the field is too small)
    buf = (member(b"././@PaxHeader", pax_record(b"size", b"5"), b"x")
           + bytes(header(b"big.txt", 0)) + b"hello" + bytes(507) + OK + end())
    items = read_all(buf)
    assert not problems_of(items) and items[0].files == {"txt": b"hello"}
    assert keys_of(items) == ["big", "ok"]


def test_long_names_that_are_not_utf8_are_read_with_replacement_characters():
    # the GNU long name raised UnicodeDecodeError (a traceback that stopped training)
    for ext in (member(b"././@LongLink", b"\xff\xfe.txt\0", b"L"),
                member(b"././@PaxHeader", pax_record(b"path", b"\xff\xfe.txt"), b"x")):
        items = read_all(ext + member(b"x.txt", b"data") + OK + end())
        assert keys_of(items) == ["\ufffd\ufffd", "ok"] and not problems_of(items)


def test_gnu_long_link_between_long_name_and_member_keeps_the_name():
    name = b"g/" + b"n" * 120 + b".txt"
    buf = (member(b"././@LongLink", name + b"\0", b"L") + member(b"././@LongLink", b"t\0", b"K")
           + member(b"short.txt", b"x") + OK + end())
    items = read_all(buf)
    assert keys_of(items) == ["g/" + "n" * 120, "ok"] and not problems_of(items)


def test_repeated_member_within_a_sample_is_reported_first_kept():
    buf = member(b"s.txt", b"one") + member(b"s.txt", b"two") + OK + end()
    items = read_all(buf)
    assert keys_of(items) == ["s", "ok"] and items[1].files == {"txt": b"one"}
    (p,) = problems_of(items)
    assert "s.txt" in p.reason and "repeats" in p.reason


# -- truncation: count exactly what is lost ------------------------------------------------------
@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    generate_shards(d, 12, seed=11, shard_size=6, speech=True, workers=1, progress=False)
    return d


def _members(path):
    with tarfile.open(path) as t:
        return {m.name: (m.offset, m.offset_data, m.size) for m in t.getmembers()}


def _copy(clean, tmp_path, name="bad"):
    d = tmp_path / name
    shutil.copytree(clean, d)
    path = d / "train-000000.tar"
    return d, path, bytearray(path.read_bytes()), _members(path)


def _key(i):
    return f"train-{i:08d}"


def _load(d, **kw):
    cfg = DataConfig(**{"shards": [str(d / "train-000000.tar")], "processors": ALL,
                        "batch_size": 4, "shuffle_buffer": 0, **kw})
    loader = ShardLoader(cfg, rank=0, world_size=1)
    return [k for b in loader for k in b["__key__"]], loader


def test_cut_inside_the_first_header_of_a_sample_keeps_the_previous_sample(clean, tmp_path):
    d, path, buf, m = _copy(clean, tmp_path)
    path.write_bytes(bytes(buf[:m[f"{_key(4)}.caption.txt"][0] + 100]))  # inside that header
    keys, loader = _load(d)
    assert keys == [_key(i) for i in range(4)]  # sample 3 is intact and read
    st = loader.stats()
    assert st["bad"] == 0 and st["lost"] == 2  # samples 4 and 5 are lost, nothing else
    rep = inspect_shards([str(path)], progress=False)
    assert rep["bad"] == 0 and rep["lost"] == 2 and rep["samples"] == 4


def test_cut_inside_the_first_member_of_a_sample_is_that_sample_truncated(clean, tmp_path):
    d, path, buf, m = _copy(clean, tmp_path)
    _, data, size = m[f"{_key(4)}.caption.txt"]
    path.write_bytes(bytes(buf[:data + size // 2]))
    keys, loader = _load(d)
    assert keys == [_key(i) for i in range(4)]
    st = loader.stats()
    assert st["bad_by_kind"] == {"truncated": 1} and st["lost"] == 1
    assert [r["key"] for r in loader.records if r["key"]] == [_key(4)]
    rep = inspect_shards([str(path)], progress=False)
    assert [b["key"] for b in rep["bad_samples"]] == [_key(4)] and rep["lost"] == 1


# -- decoded content against the schema ----------------------------------------------------------
def _flac(rate_flip: bool) -> bytes:
    data = bytearray(encode_flac((np.sin(np.arange(4000) / 7) * 9000).astype(np.int16)))
    if rate_flip:
        data[18] ^= 0x01  # STREAMINFO sample rate bit 12: 16000 Hz -> 11904 Hz, MD5 still fine
    return bytes(data)


def test_flac_at_another_rate_than_declared_is_a_bad_sample():
    assert decode_sample({"speech.flac": _flac(False)}, ("speech.flac",))["speech.flac"][1] == 16000
    with pytest.raises(SampleError) as e:
        decode_sample({"speech.flac": _flac(True)}, ("speech.flac",))
    assert e.value.kind == "mismatch" and "11904" in str(e.value) and "16000" in str(e.value)
    assert "speech.flac" in str(e.value)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A grey PNG that claims ``width x height``; its pixel data is ``idat`` (valid CRCs)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    if idat is None:
        z = zlib.compressobj()
        row = bytes(width + 1)
        idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def test_png_above_the_pixel_limit_is_refused_before_decoding():
    small = png_bomb(8, 8)
    assert decode_sample({"seg.png": small}, ("seg.png",))["seg.png"].shape == (8, 8)
    # 15000 x 15000 from a few bytes of (broken) pixel data: refused from the header alone,
    # so the kind is too_large and not corrupt (a decode would fail on the pixel data)
    bomb = png_bomb(15000, 15000, idat=zlib.compress(bytes(100)))
    for key in ("image.png", "seg.png"):
        with pytest.raises(SampleError) as e:
            decode_sample({key: bomb}, (key,))
        assert e.value.kind == "too_large" and key in str(e.value) and "15000x15000" in str(e.value)
    # the limit is a setting
    with pytest.raises(SampleError) as e:
        decode_sample({"seg.png": small}, ("seg.png",), max_pixels=63)
    assert e.value.kind == "too_large"


def test_png_without_a_valid_ihdr_is_corrupt():
    bad = PNG_SIGNATURE + _png_chunk(b"IDAT", b"") + _png_chunk(b"IEND", b"")
    with pytest.raises(SampleError) as e:
        decode_sample({"seg.png": bad}, ("seg.png",))
    assert e.value.kind == "corrupt" and "IHDR" in str(e.value)
    zero = png_bomb(0, 5, idat=b"")
    with pytest.raises(SampleError) as e:
        decode_sample({"seg.png": zero}, ("seg.png",))
    assert e.value.kind == "corrupt"


def test_loader_and_inspect_count_the_new_kinds(clean, tmp_path):
    d, path, buf, m = _copy(clean, tmp_path)
    buf[m[f"{_key(2)}.speech.flac"][1] + 18] ^= 0x01  # sample rate flipped
    path.write_bytes(buf)
    keys, loader = _load(d)
    assert sorted(keys) == [_key(i) for i in range(6) if i != 2]
    assert loader.stats()["bad_by_kind"] == {"mismatch": 1}
    rep = inspect_shards([str(path)], progress=False)
    assert rep["bad_by_kind"] == {"mismatch": 1} and rep["bad_samples"][0]["key"] == _key(2)
    # a pixel limit below ShapesWorld's 64 x 64 images makes every sample too large
    keys, loader = _load(clean, max_image_pixels=32 * 32)
    assert keys == [] and loader.stats()["bad_by_kind"] == {"too_large": 6}
    with pytest.raises(Exception, match="max_image_pixels"):
        ShardLoader(DataConfig(shards=[str(clean)], max_image_pixels=0), 0, 1)


# -- inspect --strict on broken datasets -------------------------------------------------------
def _strict(capsys, *paths):
    capsys.readouterr()
    rc = main(["data", "inspect", *map(str, paths), "--strict", "-q"])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_strict_fails_when_a_listed_shard_is_missing(clean, tmp_path, capsys):
    d, *_ = _copy(clean, tmp_path)
    assert _strict(capsys, d)[0] == 0
    (d / "train-000001.tar").unlink()
    rc, text = _strict(capsys, d)
    assert rc == 1 and "train-000001.tar" in text and "missing" in text
    rep = inspect_shards([str(d)], progress=False)
    assert rep["lost"] == 6


@pytest.mark.parametrize("content", ["{not json", '{"splits": []}', '[1, 2]',
                                     '{"splits": {"train": {"shards": [{"nam": "x"}]}}}',
                                     '{"splits": {"train": {"shards": [{"name": "train-000000'
                                     '.tar", "samples": "six"}]}}}'])
def test_strict_fails_when_the_manifest_is_unreadable(clean, tmp_path, capsys, content):
    d, *_ = _copy(clean, tmp_path)
    (d / "manifest.json").write_text(content)
    rc, text = _strict(capsys, d)
    assert rc == 1 and "manifest.json" in text and "Traceback" not in text
    rep = inspect_shards([str(d)], progress=False)
    assert rep["samples"] == 12 and any("manifest.json" in p["shard"] for p in rep["problems"])


@pytest.mark.parametrize("content", ['{"splits": []}', '{"splits": {"train": []}}',
                                     '{"splits": {"train": {"shards": [{"nam": "x"}]}}}',
                                     '{"splits": {"train": {"shards": [{"name": "../x.tar", '
                                     '"samples": 1}]}}}', "{not json"])
def test_loader_ignores_a_manifest_it_cannot_use(clean, tmp_path, content, caplog):
    d, *_ = _copy(clean, tmp_path)
    (d / "manifest.json").write_text(content)  # was a KeyError/AttributeError traceback
    cfg = DataConfig(shards=[str(d)], processors=ALL, batch_size=4, shuffle_buffer=0)
    loader = ShardLoader(cfg, rank=0, world_size=1)
    assert len([k for b in loader for k in b["__key__"]]) == 12
    assert any("manifest.json ignored" in r.getMessage() for r in caplog.records)


def test_strict_fails_when_keys_repeat(clean, tmp_path, capsys):
    d, path, *_ = _copy(clean, tmp_path)
    shutil.copy(path, d / "copy-000000.tar")  # every key of shard 0 again
    rc, text = _strict(capsys, d)
    assert rc == 1 and f"{_key(0)!r} repeats" in text
    rep = inspect_shards([str(d)], progress=False)
    assert rep["duplicates"] == 6
    # within one shard too
    one = tmp_path / "one"
    one.mkdir()
    (one / "s.tar").write_bytes(member(b"a.txt", b"1") + member(b"b.txt", b"2")
                                + member(b"a.txt", b"3") + end())
    rc, text = _strict(capsys, one / "s.tar")
    assert rc == 1 and "'a' repeats" in text


def test_strict_names_more_samples_than_the_manifest_lists(clean, tmp_path, capsys):
    d, path, *_ = _copy(clean, tmp_path)
    man = json.loads((d / "manifest.json").read_text())
    man["splits"]["train"]["shards"][0]["samples"] = 5
    man["splits"]["train"]["shards"][0].pop("sha256")
    (d / "manifest.json").write_text(json.dumps(man))
    rc, text = _strict(capsys, path)
    assert rc == 1 and "manifest lists 5 samples, found 6" in text


def test_strict_passes_on_a_clean_dataset(clean, capsys):
    rc, text = _strict(capsys, clean)
    assert rc == 0 and "samples: 12" in text and "bad samples: 0" in text and "PROBLEM" not in text


@pytest.mark.parametrize("manifest", ['{"splits": {"train": {"shards": [{"x": 1}], "keys": []}}}',
                                      '{"splits": {"train": {"shards": "nope"}}}', "[1, 2]"])
def test_manifest_entries_ignores_an_unusable_manifest(tmp_path, manifest, caplog):
    from omnimask.train.data.shards import manifest_entries

    (tmp_path / "manifest.json").write_text(manifest)
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"\0" * 1024)
    with caplog.at_level("WARNING"):
        assert manifest_entries([str(shard)]) == {}
    assert "manifest" in caplog.text


def test_shard_keys_of_a_shard_copied_without_its_manifest(small_shards, tmp_path):
    from omnimask.train.data.shards import shard_keys

    listed = sorted(str(p) for p in small_shards.glob("train-*.tar"))[:2]
    want = shard_keys(listed)  # from the manifest
    assert {"caption.txt", "image.png", "seg.png", "inst.png", "qa.json"} <= want
    copied = tmp_path / "val-000000.tar"  # no manifest lists it: its members say
    shutil.copy(listed[0], copied)
    assert shard_keys([str(copied)]) == want
    assert shard_keys([listed[1], str(copied)]) == want
    with tarfile.open(tmp_path / "bare.tar", "w") as tar:  # one sample of caption + image
        for name in ("a.caption.txt", "a.image.png", "b.caption.txt", "b.seg.png"):
            tar.add(copied, arcname=name)
    assert shard_keys([str(tmp_path / "bare.tar")]) == {"caption.txt", "image.png"}
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    with pytest.raises(DataError, match="junk.tar"):
        shard_keys([str(tmp_path / "junk.tar")])


def test_a_split_without_speech_is_one_warning_not_one_per_sample(small_shards, caplog):
    cfg = DataConfig(shards=[str(small_shards / "train-*.tar")], processors=["text", "speech"],
                     batch_size=4)
    with caplog.at_level("WARNING", logger="omnimask.data"):
        loader = ShardLoader(cfg, 0, 1)
        assert sum(len(b["__key__"]) for b in loader) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("skipped sample ") and "missing speech.flac" in lines[0]
    assert lines[1] == "skipped 60 samples in all: missing speech.flac"
    assert len(loader.records) == 60  # every sample is still listed by name
