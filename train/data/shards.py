"""Shard files: writing them (atomically, byte-reproducibly), the manifest, and shard lists.

A writer touches nothing outside the folder it was given: split names and sample keys are
names, not paths; a split's shards are written into a private staging folder inside it and
swapped in at the end, and the only files ever replaced or deleted are those the manifest
lists for that split.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import braceexpand
import webdataset as wds
from tqdm import tqdm

from omnimask.errors import DataError
from omnimask.safeio import atomic_write_bytes, fsync_path, sha256_file

from .schema import SCHEMA_VERSION, manifest_fault

log = logging.getLogger("omnimask.data")

MANIFEST = "manifest.json"
FIXED_MTIME = 1_700_000_000  # every member gets this mtime, so shards are byte-reproducible
# split names and sample keys: no dots (webdataset cuts keys at the first one), no slashes
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
MAX_SKIPPED_LISTED = 1000  # skipped rows/files named in the manifest; the count has them all
STAGE_PREFIX = ".staging."  # <dir>/.staging.<split>.<pid>.<random>/ holds a run's shards
COMMIT = "commit.json"  # in a staging folder: the new entry; its shards are complete


def check_name(value, what: str = "split") -> str:
    """``value`` if it is a plain name (a split), else a DataError naming ``what``."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise DataError(f"{what}: {value!r} is not a valid name (1-64 letters, digits, '-' or "
                        "'_', starting with a letter or digit)")
    return value


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _is_shard_name(name, split: str) -> bool:
    return isinstance(name, str) and re.fullmatch(re.escape(split) + r"-\d{6}\.tar", name) is not None



def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def _dir_lock(directory: Path):
    """An exclusive flock on the folder itself while the manifest is read and rewritten."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # filesystems without flock: no lock, as before
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_manifest(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        man = json.loads(path.read_bytes())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(man, dict) or not isinstance(man.get("splits", {}), dict):
        raise DataError(f"{path} is not an omnimask manifest (expected an object with 'splits')")
    return man


def update_manifest(directory: Path, split: str, entry: dict) -> Path:
    manifest = read_manifest(directory) or {}
    manifest["schema_version"] = SCHEMA_VERSION
    manifest.setdefault("splits", {})[split] = entry
    manifest["splits"] = dict(sorted(manifest["splits"].items()))
    path = directory / MANIFEST
    _atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _listed(directory: Path, split: str) -> list[str]:
    """The shard names the manifest lists for ``split`` (only well-formed names of it)."""
    entry = ((read_manifest(directory) or {}).get("splits") or {}).get(split)
    recs = entry.get("shards") if isinstance(entry, dict) else None
    names = [r.get("name") for r in recs or [] if isinstance(r, dict)]
    return [n for n in names if _is_shard_name(n, split)]


def _check_free(directory: Path, split: str, names, listed) -> None:
    """Refuse to replace a file the manifest does not list for this split (not ours)."""
    listed = set(listed)
    for n in names:
        if n not in listed and os.path.lexists(directory / n):
            raise DataError(f"{directory / n} exists and is not listed for split {split!r} in "
                            f"{directory / MANIFEST}; move it away or choose another output folder")


def _remove_stale(directory: Path, split: str, stale, keep) -> None:
    for n in stale:
        if _is_shard_name(n, split) and n not in keep:
            p = directory / n
            if p.is_symlink() or p.is_file():
                p.unlink()


def _remove_stage(stage: Path, split: str) -> None:
    """Delete a staging folder: only the names a writer puts there, then the folder."""
    for sub in (stage / "old", stage):
        if sub.is_symlink() or not sub.is_dir():
            continue
        for p in sub.iterdir():
            ours = p.name == COMMIT or _is_shard_name(p.name, split) or (
                p.name.startswith(f".{COMMIT}.") and p.name.endswith(".tmp"))
            if ours and (p.is_symlink() or not p.is_dir()):
                p.unlink()
        with contextlib.suppress(OSError):
            sub.rmdir()
    if stage.exists():
        log.warning("left %s in place: it holds files this writer did not put there", stage)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _roll_forward(directory: Path, split: str, stage: Path) -> bool:
    """Finish a swap that a killed writer had committed to; False if the record is unusable."""
    try:
        rec = json.loads((stage / COMMIT).read_bytes())
        entry, stale = rec["entry"], list(rec["stale"])
        names = [s["name"] for s in entry["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("cannot finish the interrupted write in %s (%s); left in place", stage, e)
        return False
    if not all(_is_shard_name(n, split) for n in names):
        log.warning("cannot finish the interrupted write in %s (bad shard names)", stage)
        return False
    for n in names:
        if (stage / n).is_file():
            os.replace(stage / n, directory / n)
    fsync_path(directory)
    update_manifest(directory, split, entry)
    _remove_stale(directory, split, stale, set(names))
    log.warning("finished the interrupted write of split %r in %s", split, directory)
    return True


def finish_interrupted(directory: str | os.PathLike, split: str) -> None:
    """Clean up after a writer of ``split`` in ``directory`` that was killed.

    A staging folder with a commit record held complete shards: the swap is finished (new
    state). One without it belonged to a run that never finished: it is removed once its
    process is gone (old state).
    """
    directory = Path(directory)
    stages = [p for p in directory.glob(f"{glob.escape(STAGE_PREFIX + split)}.*")
              if p.is_dir() and not p.is_symlink()]
    if not stages:
        return
    with _dir_lock(directory):
        for stage in sorted(stages):
            if not stage.exists():
                continue
            if (stage / COMMIT).is_file():
                if not _roll_forward(directory, split, stage):
                    continue
            else:
                pid = stage.name[len(STAGE_PREFIX) + len(split) + 1:].split(".")[0]
                if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                    continue
            _remove_stage(stage, split)


class ShardSink:
    """Write samples into ``<dir>/<split>-NNNNNN.tar`` shards of ``shard_size`` samples.

    Shards go into a staging folder inside ``dir``; on a clean exit they are swapped in, the
    split's manifest entry (sample counts, sizes, SHA-256 of every shard, skipped items,
    ``info``) is written atomically, and only then are the split's old shards that the new
    entry no longer lists deleted. An exception inside the ``with`` (or a failed swap)
    leaves the split's previous shards and manifest as they were.
    """

    def __init__(self, directory: Path, split: str, shard_size: int, info: dict,
                 total: int | None = None, progress: bool = True) -> None:
        self.split = check_name(split, "split")
        if not isinstance(shard_size, int) or shard_size < 1:
            raise DataError(f"shard size must be an integer >= 1, got {shard_size!r}")
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise DataError(f"output folder {self.dir} is a file, not a folder") from None
        finish_interrupted(self.dir, split)
        if total:  # fail before any work when the shards would replace files not ours
            _check_free(self.dir, split, [shard_name(split, i) for i in
                                          range(math.ceil(total / shard_size))],
                        _listed(self.dir, split))
        self.shard_size, self.info = shard_size, info
        self.shards: list[dict] = []
        self._writer: wds.TarWriter | None = None
        self._file = None
        self._path: Path | None = None
        self._count = 0
        self.num = 0
        self.skipped = 0
        self.skipped_items: list[dict] = []
        self.stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{split}.{os.getpid()}.",
                                           dir=self.dir))
        self._bar = tqdm(total=total, desc=f"{split} samples", unit="sample", disable=not progress)
        self.entry: dict = {}

    def _open(self) -> None:
        self._path = self.stage / shard_name(self.split, len(self.shards))
        self._file = open(self._path, "xb")  # noqa: SIM115 - closed in _close / __exit__
        self._writer = wds.TarWriter(self._file, user="omnimask", group="omnimask", mode=0o444,
                                     encoder=False, mtime=FIXED_MTIME)
        self._count = 0

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.flush()  # type: ignore[union-attr]
        os.fsync(self._file.fileno())  # type: ignore[union-attr]
        self._file.close()  # type: ignore[union-attr]
        path = self._path
        self.shards.append({"name": path.name, "samples": self._count,  # type: ignore[union-attr]
                            "bytes": path.stat().st_size, "sha256": sha256_file(path)})  # type: ignore[union-attr]
        self._writer = None

    def write(self, sample: dict) -> None:
        key = sample.get("__key__")
        if not isinstance(key, str) or not KEY_RE.match(key):
            raise DataError(f"sample key {key!r} is not a plain name (letters, digits, '-', '_')")
        if self._writer is None:
            self._open()
        self._writer.write(sample)  # type: ignore[union-attr]
        self._count += 1
        self.num += 1
        self._bar.update(1)
        if self._count >= self.shard_size:
            self._close()

    def skip(self, name: str, reason: str) -> None:
        """Count an input row or file that gives no sample; the first ones are listed."""
        self.skipped += 1
        if len(self.skipped_items) < MAX_SKIPPED_LISTED:
            self.skipped_items.append({"name": str(name), "reason": str(reason)})
        log.warning("skipped %s: %s", name, reason)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bar.close()
        if exc_type is not None:  # the split's old shards and manifest stay as they were
            self._abort()
            return
        try:
            self._close()
            self.entry = {**self.info, "num": self.num, "skipped": self.skipped,
                          "skipped_items": self.skipped_items, "shards": self.shards}
            self._commit()
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if (self.stage / COMMIT).exists():  # a rollback failed half-way: the next run finishes
            log.warning("left %s for the next writer of split %r to finish", self.stage, self.split)
        elif self.stage.exists():
            shutil.rmtree(self.stage, ignore_errors=True)  # our own mkdtemp folder

    def _commit(self) -> None:
        names = [s["name"] for s in self.shards]
        with _dir_lock(self.dir):
            listed = _listed(self.dir, self.split)
            _check_free(self.dir, self.split, names, listed)
            stale = sorted(set(listed) - set(names))
            backup = self.stage / "old"
            backup.mkdir()
            for n in names:  # keep the old shard of each name reachable for a rollback
                if os.path.lexists(self.dir / n):
                    try:
                        os.link(self.dir / n, backup / n, follow_symlinks=False)
                    except OSError:
                        shutil.copy2(self.dir / n, backup / n, follow_symlinks=False)
            # from here on the new state is complete: a killed run is rolled forward later
            _atomic_write_text(self.stage / COMMIT, json.dumps({"entry": self.entry,
                                                                "stale": stale}))
            moved: list[str] = []
            try:
                for n in names:
                    os.replace(self.stage / n, self.dir / n)
                    moved.append(n)
                fsync_path(self.dir)
                update_manifest(self.dir, self.split, self.entry)
            except BaseException:
                if not self._manifest_is_new():
                    for n in reversed(moved):
                        if os.path.lexists(backup / n):
                            os.replace(backup / n, self.dir / n)
                        else:
                            (self.dir / n).unlink(missing_ok=True)
                    fsync_path(self.dir)
                    (self.stage / COMMIT).unlink(missing_ok=True)
                    raise
            _remove_stale(self.dir, self.split, stale, set(names))
        shutil.rmtree(self.stage, ignore_errors=True)

    def _manifest_is_new(self) -> bool:
        try:
            entry = ((read_manifest(self.dir) or {}).get("splits") or {}).get(self.split)
        except DataError:
            return False
        return isinstance(entry, dict) and entry.get("shards") == self.shards


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
            except DataError as e:
                log.warning("%s; its shards are read without it", e)
                cache[d] = None
            fault = manifest_fault(cache[d]) if cache[d] else None
            if fault:
                log.warning("%s/%s is unusable (%s); its shards are read without it", d,
                            MANIFEST, fault)
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


def _first_sample_keys(shard: str) -> set[str]:
    """The keys (``caption.txt``, ``seg.png``, ...) of a shard's first sample, read as the
    loader reads it (``tario.iter_samples``)."""
    from .tario import RawSample, iter_samples, open_shard

    problem = "no members"
    try:
        with open_shard(shard) as buf:
            for item in iter_samples(buf, limit=1):
                if isinstance(item, RawSample):
                    return set(item.files)
                problem = item.reason
    except OSError as e:
        problem = str(e)
    raise DataError(f"{shard}: not a readable tar shard ({problem})")


def shard_keys(shards: list[str]) -> set[str]:
    """The sample keys every shard holds: its manifest's record where one lists it, else
    its first sample's members (a shard copied without its manifest keeps its keys)."""
    recs = manifest_entries(shards)
    per = [set(recs[s].get("keys", [])) if s in recs else _first_sample_keys(s)
           for s in shards]
    return set.intersection(*per) if per else set()
