"""Reading webdataset tar shards sample by sample, with byte offsets and error recovery.

A small ustar/pax/GNU reader (the stdlib ``tarfile`` stops at the first bad header and
cannot tell where a sample starts). It yields each sample with the byte offset of its
first header, so a reader can later seek straight back to it, and it recovers from a
damaged header by scanning forward to the next valid one. Problems are reported as
:class:`TarProblem` items in the stream; nothing here raises for bad bytes.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset: key = path to first dot


@dataclass
class RawSample:
    key: str
    offset: int  # byte offset of the sample's first header in the shard
    ordinal: int  # index of the sample within the shard
    files: dict[str, bytes] = field(default_factory=dict)  # "image.png" -> bytes
    problem: str | None = None  # set when the tar broke inside this sample
    shard: str = ""  # path of the shard, filled in by the reader


@dataclass
class TarProblem:
    offset: int
    reason: str
    cuts_sample: bool = False  # the tar ended inside a member or header


def _octal(field_: bytes) -> int:
    if field_ and field_[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field_[1:], "big")
    s = field_.split(b"\0", 1)[0].strip()
    return int(s, 8) if s else 0


def _header(buf: bytes) -> tuple[str, int, bytes]:
    """Parse one header block: (name, size, typeflag); ValueError if it is not one."""
    stored = _octal(buf[148:156])
    if stored != sum(buf) - sum(buf[148:156]) + 8 * 32:
        raise ValueError("bad header checksum")
    name = buf[0:100].split(b"\0", 1)[0]
    if buf[257:262] == b"ustar":
        prefix = buf[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace"), _octal(buf[124:136]), buf[156:157]


def _pax_path(data: bytes) -> str | None:
    path, pos = None, 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        k, _, v = data[sp + 1:pos + length - 1].partition(b"=")
        if k == b"path":
            path = v.decode("utf-8", "replace")
        pos += length
    return path


def iter_members(buf, start: int = 0, keep=None
                 ) -> Iterator[tuple[int, str, bytes | None] | TarProblem]:
    """Yield ``(header_offset, name, data)`` for regular files, or :class:`TarProblem`.

    ``buf`` is the whole shard as a bytes-like object (an ``mmap`` in the reader).
    ``keep(name)`` says whose bytes to copy out; the others yield ``None`` as data.
    """
    end = len(buf)
    pos = start
    long_name: str | None = None
    first = pos  # offset of the first header belonging to the next member
    resyncing = False
    closed = False  # seen the zero blocks that end an archive
    while True:
        if pos + BLOCK > end:
            if pos < end or resyncing:
                yield TarProblem(pos, "tar ends in the middle of a header (truncated shard)", True)
            elif not closed:
                yield TarProblem(pos, "tar has no end-of-archive marker (truncated shard?)")
            return
        hdr = buf[pos:pos + BLOCK]
        if hdr == ZERO_BLOCK:
            closed = True
            pos += BLOCK
            first = pos
            continue
        try:
            name, size, kind = _header(hdr)
        except ValueError as e:
            if not resyncing:
                yield TarProblem(pos, f"damaged tar header ({e}); skipping to the next header")
                resyncing = True
            pos += BLOCK
            first = pos
            continue
        resyncing = closed = False
        if pos + BLOCK + size > end:
            yield TarProblem(pos, f"tar ends inside member {long_name or name!r} (truncated shard)",
                             True)
            return
        data_at = pos + BLOCK
        pos += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in (b"x", b"L"):
            data = buf[data_at:data_at + size]  # pax or GNU long name for the next member
            long_name = _pax_path(data) if kind == b"x" else data.split(b"\0", 1)[0].decode()
            continue
        if kind == b"g":
            first = pos
            continue
        if kind in (b"0", b"\0", b"7"):
            name = long_name or name
            keep_it = keep is None or keep(name)
            yield first, name, buf[data_at:data_at + size] if keep_it else None
        long_name = None
        first = pos


@contextmanager
def open_shard(path: str):
    """Map a shard into memory (read-only); an empty file maps to ``b""``."""
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            yield b""
            return
        try:
            yield mm
        finally:
            mm.close()


def iter_samples(buf, start: int = 0, ordinal: int = 0, limit: int | None = None,
                 keys=None) -> Iterator[RawSample | TarProblem]:
    """Group consecutive members by key into samples (webdataset's convention).

    Starts at byte ``start`` (a sample boundary) whose sample has index ``ordinal``; stops
    after ``limit`` samples when given. With ``keys`` (e.g. ``{"image.png"}``) only those
    members are copied out; the others are skipped without reading their bytes.
    """
    keep = None
    if keys is not None:
        wanted = tuple("." + k for k in keys)

        def keep(name: str) -> bool:
            return name.endswith(wanted)

    cur: RawSample | None = None
    count = 0
    for item in iter_members(buf, start, keep):
        if isinstance(item, TarProblem):
            if cur is not None and item.cuts_sample:
                cur.problem = item.reason
            yield item
            continue
        off, name, data = item
        m = _KEY_RE.match(name)
        if m is None:
            yield TarProblem(off, f"member {name!r} has no extension; ignored")
            continue
        key, ext = m.group(1), m.group(2)
        if cur is not None and key != cur.key:
            yield cur
            count += 1
            cur = None
            if limit is not None and count >= limit:
                return
        if cur is None:
            cur = RawSample(key=key, offset=off, ordinal=ordinal + count)
        if data is not None:
            cur.files[ext] = data
    if cur is not None:
        yield cur
