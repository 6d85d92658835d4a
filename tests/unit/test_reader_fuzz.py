"""Fuzzing the shard readers: the tar reader and the sample decoder never raise, never spin,
and every sample is either delivered, counted bad, or counted lost.

Deterministic (``derandomize=True``, fixed seeds) and bounded: a few seconds in all.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnimask.config import DataConfig
from omnimask.train.data.inspect import inspect_shards
from omnimask.train.data.pipeline import ShardLoader
from omnimask.train.data.schema import PNG_SIGNATURE, SampleError, decode_sample
from omnimask.train.data.shapesworld import generate_shards, make_sample
from omnimask.train.data.tario import RawSample

from .test_reader_hardening import OK, end, fix_checksum, keys_of, member, read_all, time_guard

ALL = ["image", "masks", "text", "qa", "refs", "meta", "speech"]


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None)


# -- the tar reader ---------------------------------------------------------------------------
records = st.lists(st.tuples(st.integers(-3, 200), st.sampled_from([b"path", b"mtime", b"k", b""]),
                             st.binary(max_size=30)), max_size=4)


@fuzz(120)
@given(kind=st.sampled_from([b"x", b"L", b"K", b"g"]), raw=st.binary(max_size=700),
       recs=records, as_records=st.booleans())
def test_fuzzed_extended_headers_never_stop_the_reader(kind, raw, recs, as_records):
    payload = b"".join(b"%d %s=%s\n" % r for r in recs) if as_records else raw
    buf = member(b"././@Ext", payload, kind) + member(b"long.txt", b"data") + OK + end()
    items = read_all(buf)  # no exception, bounded time and items
    assert keys_of(items)[-1] == "ok"  # the sample after the damage is found


def _tar(fmt, long: bool) -> tuple[bytes, list[tarfile.TarInfo]]:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as w:
        for i in range(3):
            for ext, data in (("txt", b"t%d" % i * 50), ("cls", b"%d" % i)):
                info = tarfile.TarInfo(("d/" + "n" * 120 if long else "") + f"s{i}.{ext}")
                info.size = len(data)
                w.addfile(info, io.BytesIO(data))
    buf = out.getvalue()
    with tarfile.open(fileobj=io.BytesIO(buf)) as t:
        return buf, t.getmembers()


def _headers(buf: bytes) -> list[int]:
    """Offsets of every header block (extended ones too) of an intact archive."""
    out, pos = [], 0
    while pos + 512 <= len(buf) and buf[pos:pos + 512] != bytes(512):
        out.append(pos)
        size = int(buf[pos + 124:pos + 136].split(b"\0")[0].strip() or b"0", 8)
        pos += 512 + -(-size // 512) * 512
    return out


# numbers a header field may hold that int() or a naive reader gets wrong
TRICKY = [b"-1000\0", b"-2000\0", b"-0\0", b"0o17\0", b"1_0\0", b"+7\0", b" 7 \0", b"\xff" * 12,
          b"\x80" + b"\xff" * 11, b"\x81\0", b"77777777777\0", b"\0" * 12]
FIELDS = {"name": (0, 100), "mode": (100, 108), "size": (124, 136), "chksum": (148, 156),
          "type": (156, 157), "magic": (257, 265), "prefix": (345, 500), "block": (0, 512)}
FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]


@fuzz(200)
@given(fmt=st.sampled_from(FORMATS), long=st.booleans(), which=st.integers(0, 100),
       field=st.sampled_from(sorted(FIELDS)),
       junk=st.one_of(st.sampled_from(TRICKY), st.binary(min_size=1, max_size=512)),
       fix=st.booleans())
def test_fuzzed_header_fields_never_stop_the_reader(fmt, long, which, field, junk, fix):
    buf, members = _tar(fmt, long and fmt != tarfile.USTAR_FORMAT)
    heads = _headers(buf)
    at = heads[which % len(heads)]
    lo, hi = FIELDS[field]
    block = bytearray(buf[at:at + 512])
    block[lo:hi] = junk.ljust(hi - lo, b" ")[:hi - lo] if junk in TRICKY else \
        (junk * (512 // len(junk) + 1))[:hi - lo]
    if fix:  # a hostile header: its checksum matches its fields
        fix_checksum(block)
    bad = buf[:at] + bytes(block) + buf[at + 512:]
    items = read_all(bad)
    got = {s.key: s.files for s in items if isinstance(s, RawSample)}
    for m in members:  # members wholly before the changed header are read as written
        if m.offset_data + m.size <= at:
            key, ext = m.name.split(".", 1)
            assert got[key][ext] == buf[m.offset_data:m.offset_data + m.size]


def test_tricky_numbers_in_every_numeric_field_of_every_header():
    for fmt in FORMATS:
        buf, members = _tar(fmt, fmt != tarfile.USTAR_FORMAT)
        for at in _headers(buf):
            before = {m.name.split(".")[0] for m in members if m.offset_data + m.size <= at}
            for lo, hi in ((100, 108), (124, 136), (136, 148), (148, 156)):
                for value in TRICKY:
                    block = bytearray(buf[at:at + 512])
                    block[lo:hi] = value.ljust(hi - lo, b" ")[:hi - lo]
                    if lo != 148:
                        fix_checksum(block)
                    items = read_all(buf[:at] + bytes(block) + buf[at + 512:], seconds=2)
                    assert before <= set(keys_of(items))  # no spin, no exception, no loss


@fuzz(150)
@given(fmt=st.sampled_from(FORMATS), long=st.booleans(), frac=st.floats(0, 1))
def test_any_truncation_loses_exactly_the_cut_samples(fmt, long, frac):
    buf, members = _tar(fmt, long and fmt != tarfile.USTAR_FORMAT)
    cut = int(len(buf) * frac)
    items = read_all(buf[:cut])
    want: dict[str, tuple[set[str], bool]] = {}  # key -> (members read, truncated)
    for m in members:
        key, ext = m.name.split(".", 1)
        if cut < m.offset_data:
            continue  # a cut header: the member is unknown, its sample may still be read
        exts, _ = want.get(key, (set(), False))
        if m.offset_data + m.size <= cut:
            want[key] = (exts | {ext}, False)
        else:
            want[key] = (exts, True)  # the tar ends inside its data: the sample is truncated
    got = {s.key: (set(s.files), s.problem is not None) for s in items if isinstance(s, RawSample)}
    assert got == want


# -- the sample decoder -----------------------------------------------------------------------
SAMPLE = make_sample(7, "train", 1, speech=True)
MEMBERS = ["image.png", "seg.png", "inst.png", "speech.flac", "qa.json", "meta.json",
           "caption.txt", "refs.json"]


def _fix_png_crcs(data: bytearray) -> bytearray:
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        if pos + 12 + n > len(data):
            break
        struct.pack_into(">I", data, pos + 8 + n, zlib.crc32(data[pos + 4:pos + 8 + n]))
        pos += 12 + n
    return data


def _mutate(data: bytes, how: str, at: int, junk: bytes, fix: bool, key: str) -> bytes:
    b = bytearray(data)
    i = at % max(len(b), 1)
    if how == "flip":
        for j, x in enumerate(junk[:4]):
            b[(i + 97 * j) % len(b)] ^= x or 1
    elif how == "overwrite":
        b[i:i + len(junk)] = junk
    elif how == "truncate":
        del b[i:]
    else:  # "header": the first 64 bytes (PNG IHDR / FLAC STREAMINFO)
        b[(8 + i % 48) % len(b)] ^= junk[0] or 1
    if fix and key.endswith(".png"):  # hostile: valid CRCs over wrong contents
        _fix_png_crcs(b)
    return bytes(b)


@fuzz(250)
@given(key=st.sampled_from(MEMBERS), how=st.sampled_from(["flip", "overwrite", "truncate", "header"]),
       at=st.integers(0, 1 << 20), junk=st.binary(min_size=1, max_size=64), fix=st.booleans())
def test_fuzzed_members_decode_or_are_bad(key, how, at, junk, fix):
    data = _mutate(SAMPLE[key], how, at, junk, fix, key)
    with time_guard(5):
        try:
            out = decode_sample({key: data}, (key,))
        except SampleError as e:
            assert e.kind in ("corrupt", "too_large", "mismatch") and key in str(e)
        else:
            assert key in out


def test_hostile_png_pixel_data_is_refused_not_crashing():
    """libpng errors while reading rows kill the process inside torchvision's decoder."""
    from .test_reader_hardening import png_bomb

    rows = bytes(9) * 8
    partial = zlib.compressobj()
    partial = partial.compress(rows) + partial.flush(zlib.Z_SYNC_FLUSH)
    for idat in (b"", zlib.compress(rows[:30]), zlib.compress(rows + b"\0"), partial,
                 partial + b"\xff" * 8, zlib.compress(b"\x07" + rows[1:]), b"\x78\x9c\x01\x02",
                 zlib.compress(rows)[:-4] + b"\0\0\0\0"):
        with pytest.raises(SampleError) as e:
            decode_sample({"seg.png": png_bomb(8, 8, idat)}, ("seg.png",))
        assert e.value.kind == "corrupt"
    assert decode_sample({"seg.png": png_bomb(8, 8, zlib.compress(rows))}, ("seg.png",))


# -- the whole reader over a real shard ---------------------------------------------------------
N = 10


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    generate_shards(d, N, seed=4, shard_size=N, speech=True, workers=1, progress=False)
    path = d / "train-000000.tar"
    ends: dict[str, int] = {}  # sample key -> end of its last member's data
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key = m.name.split(".", 1)[0]
            ends[key] = max(ends.get(key, 0), m.offset_data + m.size)
        heads = sorted({m.offset for m in t.getmembers()})
    return d, path, path.read_bytes(), heads, ends


def _mutations(raw: bytes, heads: list[int], rng: np.random.Generator) -> bytes:
    b = bytearray(raw)
    how = rng.integers(5)
    if how == 0:  # a few flipped bytes anywhere
        for _ in range(rng.integers(1, 4)):
            b[rng.integers(len(b))] ^= int(rng.integers(1, 256))
    elif how == 1:  # truncation, half the time inside a header
        cut = int(rng.choice(heads)) + int(rng.integers(512)) if rng.integers(2) else \
            int(rng.integers(len(b)))
        del b[cut:]
    elif how == 2:  # a hostile size, mode or type in a header with a matching checksum
        at = int(rng.choice(heads))
        lo, hi = [(124, 136), (100, 108), (156, 157)][rng.integers(3)]
        b[at + lo:at + hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
        if rng.integers(2):
            size = TRICKY[rng.integers(len(TRICKY))] if rng.integers(2) else \
                b"%011o\0" % int(rng.integers(0, len(b)))
            b[at + 124:at + 136] = size.ljust(12, b" ")[:12]
        b[at:at + 512] = fix_checksum(bytearray(b[at:at + 512]))
    elif how == 3:  # bytes inserted: everything after is out of block alignment
        at = int(rng.integers(len(b)))
        b[at:at] = rng.integers(0, 256, int(rng.integers(1, 1100)), dtype=np.uint8).tobytes()
    else:  # a run of garbage over a random span
        at, n = int(rng.integers(len(b))), int(rng.integers(1, 2000))
        b[at:at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()[:len(b) - at]
    return bytes(b)


@pytest.mark.parametrize("seed", range(4))
def test_random_mutations_every_sample_is_delivered_or_counted(shard, tmp_path, seed):
    d, path, raw, heads, ends = shard
    rng = np.random.default_rng(seed)
    work = tmp_path / "s"
    work.mkdir()
    (work / "manifest.json").write_bytes((d / "manifest.json").read_bytes())
    target = work / path.name
    orig = {f"train-{i:08d}" for i in range(N)}
    for _ in range(8):
        bad = _mutations(raw, heads, rng)
        target.write_bytes(bad)
        n = min(len(bad), len(raw))
        diff = np.flatnonzero(np.frombuffer(bad, np.uint8, n) != np.frombuffer(raw, np.uint8, n))
        first = int(diff[0]) if diff.size else n  # the first byte that differs

        cfg = DataConfig(shards=[str(target)], processors=ALL, batch_size=4, shuffle_buffer=0)
        loader = ShardLoader(cfg, rank=0, world_size=1)
        with time_guard(20):
            keys = [k for b in loader for k in b["__key__"]]
            rep = inspect_shards([str(target)], progress=False)
        st_ = loader.stats()
        bad_keys = {r["key"] for r in loader.records if r["key"]}
        assert len(keys) == len(set(keys)) and set(keys) <= orig
        assert {k for k, e in ends.items() if e <= first} <= set(keys)  # intact ones are read
        assert len(keys) + st_["bad"] + st_["lost"] == N
        assert len(orig - set(keys) - bad_keys) == st_["lost"]
        assert rep["lost"] == st_["lost"]
        assert rep["bad"] == st_["bad"] - st_["bad_by_kind"].get("invalid", 0)
