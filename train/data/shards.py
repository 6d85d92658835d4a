"""Shard files: writing them (atomically, byte-reproducibly), the manifest, and shard lists."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

import braceexpand
import webdataset as wds
from tqdm import tqdm

from omnimask.errors import DataError

from .schema import SCHEMA_VERSION

MANIFEST = "manifest.json"
FIXED_MTIME = 1_700_000_000  # every member gets this mtime, so shards are byte-reproducible


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_manifest(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON: {e}") from None


def update_manifest(directory: Path, split: str, entry: dict) -> Path:
    manifest = read_manifest(directory) or {}
    manifest["schema_version"] = SCHEMA_VERSION
    manifest.setdefault("splits", {})[split] = entry
    manifest["splits"] = dict(sorted(manifest["splits"].items()))
    path = directory / MANIFEST
    _atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


class ShardSink:
    """Write samples into ``<dir>/<split>-NNNNNN.tar`` shards of ``shard_size`` samples.

    Each shard is written to a temporary name and renamed when complete; on exit the split's
    manifest entry (sample counts, sizes, SHA-256 of every shard, ``info``) is written and
    shards of an earlier, longer run of the same split are removed.
    """

    def __init__(self, directory: Path, split: str, shard_size: int, info: dict,
                 total: int | None = None, progress: bool = True) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split, self.shard_size, self.info = split, shard_size, info
        self.shards: list[dict] = []
        self._writer: wds.TarWriter | None = None
        self._file = None
        self._tmp: Path | None = None
        self._count = 0
        self.skipped = 0
        self._bar = tqdm(total=total, desc=f"{split} samples", unit="sample", disable=not progress)
        self.entry: dict = {}

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tmp = self.dir / (name + ".tmp")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _close / __exit__
        self._writer = wds.TarWriter(self._file, user="omnimask", group="omnimask", mode=0o444,
                                     encoder=False, mtime=FIXED_MTIME)
        self._count = 0

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()  # type: ignore[union-attr]
        final = self._tmp.with_suffix("")  # type: ignore[union-attr]
        os.replace(self._tmp, final)  # type: ignore[arg-type]
        self.shards.append({"name": final.name, "samples": self._count,
                            "bytes": final.stat().st_size, "sha256": _sha256(final)})
        self._writer = None

    def write(self, sample: dict) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(sample)  # type: ignore[union-attr]
        self._count += 1
        self._bar.update(1)
        if self._count >= self.shard_size:
            self._close()

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bar.close()
        if exc_type is not None:  # leave no half-written shard behind
            if self._writer is not None:
                self._file.close()  # type: ignore[union-attr]
                self._tmp.unlink(missing_ok=True)  # type: ignore[union-attr]
            return
        self._close()
        keep = {s["name"] for s in self.shards}
        for stale in self.dir.glob(f"{glob.escape(self.split)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            if stale.name not in keep:
                stale.unlink()
        self.entry = {**self.info, "num": sum(s["samples"] for s in self.shards),
                      "skipped": self.skipped, "shards": self.shards}
        update_manifest(self.dir, self.split, self.entry)


def expand_shards(patterns: list[str] | tuple[str, ...] | str) -> list[str]:
    """Expand paths, globs and ``{000..009}`` patterns; fail before any work if none exist."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise DataError("no shards given (the shard list is empty)")
    out: list[str] = []
    for pat in patterns:
        for p in braceexpand.braceexpand(str(pat)):
            if glob.has_magic(p):
                hits = sorted(glob.glob(p))
                if not hits:
                    raise DataError(f"no shard matches {p!r}")
                out.extend(hits)
            elif Path(p).is_dir():
                hits = sorted(str(x) for x in Path(p).glob("*.tar"))
                if not hits:
                    raise DataError(f"directory {p!r} holds no .tar shards")
                out.extend(hits)
            elif not Path(p).is_file():
                raise DataError(f"shard not found: {p}")
            else:
                out.append(p)
    return out


def manifest_entries(shards: list[str]) -> dict[str, dict]:
    """For each shard path, its manifest record (with the split's keys), where one exists."""
    found: dict[str, dict] = {}
    cache: dict[str, dict | None] = {}
    for s in shards:
        d = str(Path(s).parent)
        if d not in cache:
            try:
                cache[d] = read_manifest(d)
            except DataError:
                cache[d] = None
        man = cache[d]
        if not man:
            continue
        for split, entry in man.get("splits", {}).items():
            for rec in entry.get("shards", []):
                if rec["name"] == Path(s).name:
                    found[s] = {**rec, "split": split, "keys": entry.get("keys", []),
                                "schema_version": man.get("schema_version")}
    return found
