"""Reading webdataset tar shards sample by sample, with byte offsets and error recovery.

A small ustar/pax/GNU reader (the stdlib ``tarfile`` stops at the first bad header and
cannot tell where a sample starts). It yields each sample with the byte offset of its
first header, so a reader can later seek straight back to it, and it recovers from a
damaged header by scanning forward to the next valid one. Every number and length in a
header is validated and bounded (a bad one is a damaged header), so hostile bytes can
neither raise nor stall the reader. Problems are reported as :class:`TarProblem` items in
the stream; nothing here raises for bad bytes.
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
    member: str | None = None  # the member the tar ended inside: its sample is truncated


MAX_NAME = 4096  # bytes in a member name (PATH_MAX); longer is a damaged header
MAX_EXTENDED = 1 << 20  # bytes of pax / GNU long-name data for one member
_EXTENDED = (b"x", b"L", b"K")  # pax, GNU long name, GNU long link name: they describe the next member
_OCTAL = b"01234567"


def _octal(field_: bytes) -> int:
    """A numeric header field: octal digits (NUL/space padded) or GNU base-256 (positive)."""
    if field_ and field_[0] & 0x80:
        if field_[0] != 0x80:  # 0xff: negative; anything else is not base-256 either
            raise ValueError("bad base-256 number")
        return int.from_bytes(field_[1:], "big")
    s = field_.split(b"\0", 1)[0].strip()
    if s.translate(None, _OCTAL):  # int() would also take "-7", "+7", "0o7", "7_7"
        raise ValueError(f"bad octal number {s[:12]!r}")
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


def _name(raw: bytes) -> str:
    if len(raw) > MAX_NAME:
        raise ValueError(f"name of {len(raw)} bytes (limit {MAX_NAME})")
    return raw.decode("utf-8", "replace")


def _pax(data: bytes) -> tuple[str | None, int | None]:
    """(path, size) from pax records ``"<len> key=value\\n"``; ValueError if malformed."""
    path = size = None
    pos, end = 0, len(data)
    while pos < end and data[pos] != 0:  # some writers pad the records with NULs
        sp = data.find(b" ", pos, pos + 12)
        if sp < 0 or not data[pos:sp].isdigit():
            raise ValueError(f"pax record at {pos} has no length")
        length = int(data[pos:sp])
        stop = pos + length
        if length <= sp + 1 - pos or stop > end or data[stop - 1] != 0x0A:
            raise ValueError(f"pax record at {pos} has a bad length {length}")
        key, eq, value = data[sp + 1:stop - 1].partition(b"=")
        if not eq:
            raise ValueError(f"pax record at {pos} has no '='")
        if key == b"path":
            path = _name(value) if value else None
        elif key == b"size":
            if not value.isdigit():
                raise ValueError(f"pax size {value[:20]!r} is not a number")
            size = int(value)
        pos = stop
    return path, size


def iter_members(buf, start: int = 0, keep=None
                 ) -> Iterator[tuple[int, str, bytes | None] | TarProblem]:
    """Yield ``(header_offset, name, data)`` for regular files, or :class:`TarProblem`.

    ``buf`` is the whole shard as a bytes-like object (an ``mmap`` in the reader).
    ``keep(name)`` says whose bytes to copy out; the others yield ``None`` as data.
    A damaged header (bad checksum or numbers, malformed pax / long-name data) is one
    problem; the reader scans on to the next valid header. After damaged pax / long-name
    data, the member it describes is skipped: its stored name cannot be trusted.
    """
    end = len(buf)
    pos = start
    long_name: str | None = None
    pax_size: int | None = None
    orphan = False  # the next member's extended header was damaged
    first = pos  # offset of the first header belonging to the next member
    resyncing = False
    closed = False  # seen the zero blocks that end an archive
    while True:
        if pos + BLOCK > end:
            if pos < end:
                yield TarProblem(pos, "tar ends in the middle of a header (truncated shard)")
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
            long_name, pax_size, orphan = None, None, False  # they described this member
            pos += BLOCK
            first = pos
            continue
        resyncing = closed = False
        if kind in _EXTENDED:
            if pos + BLOCK + size > end:
                yield TarProblem(pos, "tar ends inside an extended header (truncated shard)")
                return
            data = buf[pos + BLOCK:pos + BLOCK + min(size, MAX_EXTENDED)]
            try:
                if size > MAX_EXTENDED:
                    raise ValueError(f"{size} bytes (limit {MAX_EXTENDED})")
                if kind == b"x":
                    long_name, pax_size = _pax(data)
                elif kind == b"L":
                    long_name = _name(data.split(b"\0", 1)[0])
            except ValueError as e:
                what = {b"x": "pax", b"L": "GNU long-name", b"K": "GNU long-link"}[kind]
                yield TarProblem(pos, f"damaged {what} header ({e}); the member it describes "
                                      f"is skipped")
                long_name, pax_size, orphan = None, None, True
            pos += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
            continue
        if kind != b"g":  # a pax global header leaves the next member's values pending
            if pax_size is not None:
                size, pax_size = pax_size, None
            name = long_name or name
        data_at = pos + BLOCK
        if data_at + size > end:
            cut = kind in (b"0", b"\0", b"7") and not orphan
            yield TarProblem(first if cut else pos,
                             f"tar ends inside member {name!r} (truncated shard)",
                             name if cut else None)
            return
        pos = data_at + (size + BLOCK - 1) // BLOCK * BLOCK
        if kind == b"g":
            first = pos
            continue
        if kind in (b"0", b"\0", b"7") and not orphan:
            keep_it = keep is None or keep(name)
            yield first, name, buf[data_at:data_at + size] if keep_it else None
        long_name, orphan = None, False
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
    exts: set[str] = set()  # member extensions of `cur`, kept or not
    count = 0
    for item in iter_members(buf, start, keep):
        if isinstance(item, TarProblem):
            yield item
            m = _KEY_RE.match(item.member) if item.member is not None else None
            if m is None:  # a cut header or damage: no sample is known to be hit
                continue
            if cur is not None and m.group(1) == cur.key:
                cur.problem = item.reason
                continue
            if cur is not None:  # the cut member starts the next sample; `cur` is whole
                yield cur
                count += 1
                if limit is not None and count >= limit:
                    return
            cur = RawSample(key=m.group(1), offset=item.offset, ordinal=ordinal + count,
                            problem=item.reason)
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
            exts = set()
        if ext in exts:
            yield TarProblem(off, f"member {name!r} repeats within its sample; the first is kept")
            continue
        exts.add(ext)
        if data is not None:
            cur.files[ext] = data
    if cur is not None:
        yield cur
