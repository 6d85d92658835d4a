"""Verified downloads into the cache (``$OMNIMASK_HOME``, default ``~/.cache/omnimask``).

A file is streamed into ``HOME/zoo/.partial/<sha256>.part`` (the cache's filesystem),
checked against the manifest's size and SHA-256, fsynced and renamed into place: the cache
only ever holds verified files. A cut transfer leaves its bytes in ``.partial`` and the
next call asks for the rest with an HTTP range (a server that ignores ranges sends the
whole file again). One file lock per entry: concurrent processes transfer once. With
``OMNIMASK_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` no socket is opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from omnimask.errors import OmnimaskError
from omnimask.safeio import atomic_write_bytes, fsync_path, safe_extract, sha256_file

from .manifest import ZooEntry, ZooFile

CHUNK = 1 << 16
TIMEOUT_S = 30.0
USER_AGENT = "omnimask-zoo"


class DownloadError(OmnimaskError):
    """A transfer failed or a file does not match its manifest; nothing was cached."""


class OfflineError(OmnimaskError):
    """Offline mode and the cache lacks a file."""


def home() -> Path:
    return Path(os.environ.get("OMNIMASK_HOME") or Path.home() / ".cache" / "omnimask")


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("OMNIMASK_OFFLINE", "HF_HUB_OFFLINE"))


def entry_dir(entry: ZooEntry, root: Path) -> Path:
    """Where ``entry``'s model directory is cached: one folder per (name, file hashes), so
    a republished entry never mixes with the old one."""
    digest = hashlib.sha256("\n".join(f"{f.path} {f.sha256}" for f in sorted(
        entry.files, key=lambda f: f.path)).encode()).hexdigest()[:16]
    return root / "zoo" / "models" / entry.name / digest


def resolve_url(f: ZooFile, entry: ZooEntry) -> str:
    """``f.url`` made absolute against the manifest it came from."""
    if "://" in f.url:
        return f.url
    src = entry.source
    if "://" in src:
        return urllib.parse.urljoin(src, f.url)
    return (Path(src).parent / f.url).resolve().as_uri()


def cached(entry: ZooEntry, root: Path) -> bool:
    d = entry_dir(entry, root)
    return all(_present(d / f.path, f) for f in entry.files)


def _whole(path: Path, f: ZooFile) -> bool:
    """Files enter the cache only verified, so their size tells."""
    return path.is_file() and path.stat().st_size == f.size


def _present(path: Path, f: ZooFile) -> bool:
    """In the cache, and an archive unpacked too (its mark)."""
    return _whole(path, f) and (not f.extract or _mark(path).is_file())


def _mark(path: Path) -> Path:
    return path.with_name(f".{path.name}.extracted")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def fetch_entry(entry: ZooEntry, root: Path | None = None, progress: bool | None = None,
                force: bool = False) -> Path:
    """``entry``'s files in the cache, downloaded and verified where missing; the model
    directory's path."""
    root = home() if root is None else Path(root)
    d = entry_dir(entry, root)
    if not force and cached(entry, root):
        return d
    if offline():
        missing = [f.path for f in entry.files if not _present(d / f.path, f)]
        raise OfflineError(f"offline (OMNIMASK_OFFLINE/HF_HUB_OFFLINE) and the cache {d} lacks "
                           f"{entry.name}'s {', '.join(missing)}; download it once online "
                           "(omnimask zoo download NAME)")
    with _lock(d.with_name(d.name + ".lock")):
        for f in entry.files:
            target = d / f.path
            if not force and _present(target, f):  # another process finished it meanwhile
                continue
            if force or not _whole(target, f):
                fetch_file(resolve_url(f, entry), target, f, root, progress, entry.name)
            if f.extract:
                try:
                    safe_extract(target, d)
                except OmnimaskError:
                    target.unlink(missing_ok=True)  # refused: not kept in the cache
                    raise
                atomic_write_bytes(_mark(target), f.sha256.encode())
    return d


def fetch_file(url: str, target: Path, f: ZooFile, root: Path, progress: bool | None,
               what: str) -> Path:
    """One file into ``target``, through ``root``'s partial folder; verified, or an error
    naming the file and both hashes with nothing left behind."""
    part_dir = root / "zoo" / ".partial"
    part_dir.mkdir(parents=True, exist_ok=True)
    part = part_dir / f"{f.sha256}.part"
    label = f"{what}: {f.path}"
    for attempt in (0, 1):  # a resumed transfer that fails the check restarts once
        resumed = part.exists() and 0 < part.stat().st_size <= f.size
        if not resumed:
            part.unlink(missing_ok=True)
        if not (resumed and part.stat().st_size == f.size):
            _transfer(url, part, f, label, progress)
        # a transfer that ended without an error is the whole file as the source has it
        size = part.stat().st_size if part.exists() else 0
        got = sha256_file(part) if part.exists() else hashlib.sha256().hexdigest()
        if got == f.sha256 and part.stat().st_size == f.size:
            break
        part.unlink(missing_ok=True)
        if not resumed or attempt:
            raise DownloadError(f"{f.path} of {what} from {url}: SHA-256 {got} ({size} bytes), "
                                f"the manifest says {f.sha256} ({f.size} bytes); the file was "
                                "discarded, nothing was cached")
    fsync_path(part)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, target)
    fsync_path(target.parent)
    return target


def _bar(total: int, initial: int, label: str, progress: bool | None):
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=label, disable=not show, leave=False)


def _transfer(url: str, part: Path, f: ZooFile, label: str, progress: bool | None) -> None:
    """Append the rest of ``url`` to ``part`` (the whole of it when the source cannot
    start mid-way); never more than ``_cap(f.size)`` bytes. A stream shorter than its
    Content-Length is a cut (the part stays, to resume)."""
    if url.startswith("hf://"):
        return _from_hub(url, part, label)
    have = part.stat().st_size if part.exists() else 0
    if url.startswith("file://"):
        src = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        if not src.is_file():
            raise DownloadError(f"{label}: {src} does not exist")
        with open(src, "rb") as r, open(part, "wb") as w, _bar(f.size, 0, label,
                                                                 progress) as bar:
            _copy(r, w, _cap(f.size), bar, url)
        if src.stat().st_size != f.size:  # a local file is whole or wrong, never cut
            part.unlink(missing_ok=True)
            raise DownloadError(f"{f.path} of {label.split(':')[0]} at {src}: SHA-256 "
                                f"{sha256_file(src)} ({src.stat().st_size} bytes), the manifest "
                                f"says {f.sha256} ({f.size} bytes); nothing was cached")
        return None
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            start = 0
            if r.status == 206:
                crange = r.headers.get("Content-Range", "")
                start = int(crange.split()[1].split("-")[0]) if crange.startswith(
                    "bytes ") else -1
                if start != have:
                    raise DownloadError(f"{label}: {url} answered the range request from "
                                        f"byte {have} with {crange!r}")
            mode = "ab" if start else "wb"  # 200: the server sent the whole file
            length = r.headers.get("Content-Length")
            with open(part, mode) as w, _bar(f.size, start, label, progress) as bar:
                n = _copy(r, w, _cap(f.size) - start, bar, url)
            if length is not None and length.isdigit() and n < int(length):
                raise DownloadError(f"{label}: the transfer from {url} stopped at byte "
                                    f"{start + n} of {start + int(length)}; run the same "
                                    "command again to resume")
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range lies past the file: start again
            part.unlink(missing_ok=True)
            return _transfer(url, part, f, label, progress)
        raise DownloadError(f"{label}: {url} answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"{label}: downloading {url} failed ({reason}); run the same "
                            "command again to resume") from None
    return None


def _cap(size: int) -> int:
    """The most bytes read for a file of ``size``: a longer one is hashed whole for the
    error message up to this, never streamed without end."""
    return 2 * size + (1 << 20)


def _copy(r, w, limit: int, bar, url: str) -> int:
    """Copy at most ``limit`` bytes from ``r`` to ``w``; the number copied."""
    n = 0
    while n < limit and (chunk := r.read(min(CHUNK, limit - n))):
        n += len(chunk)
        w.write(chunk)
        bar.update(len(chunk))
    return n


def _from_hub(url: str, part: Path, label: str) -> None:
    """``hf://org/repo[@revision]/path`` through huggingface_hub (its cache, its offline
    switch), copied into ``part`` for the same verification."""
    repo, rev, path = split_hf(url)
    if not path:
        raise DownloadError(f"{label}: {url} names no file inside the repository")
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(repo_id=repo, filename=path, revision=rev)
    except Exception as e:  # noqa: BLE001 - the hub's errors are many; one line names the cause
        raise DownloadError(f"{label}: {url}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    shutil.copyfile(local, part)


def split_hf(url: str) -> tuple[str, str | None, str]:
    """``hf://org/repo[@rev][/path]`` -> (``org/repo``, revision or None, path)."""
    rest = url.removeprefix("hf://")
    parts = rest.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise OmnimaskError(f"{url}: expected hf://org/repo[@revision][/path]")
    repo, path = "/".join(parts[:2]), "/".join(parts[2:])
    rev = None
    if "@" in repo:
        repo, rev = repo.split("@", 1)
    return repo, rev, path
