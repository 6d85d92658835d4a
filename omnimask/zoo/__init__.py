"""The model zoo: named models from manifests, downloaded once into a verified cache.

``entries()`` reads the manifest shipped with omnimask (the repository's ``zoo/``) and the
user's (``OMNIMASK_ZOO``: paths or URLs, comma-separated; later ones win on a name).
``resolve(source)`` turns a model directory, a zoo name or ``hf://org/repo[@rev]`` into a
local model directory, downloading and verifying what the cache lacks;
``omnimask.load`` goes through it. ``publish`` (``zoo/publish.py``) writes entries.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import urllib.request
from pathlib import Path

from omnimask.errors import OmnimaskError

from .fetch import DownloadError, OfflineError, fetch_entry, home, offline, split_hf
from .manifest import ManifestError, ZooEntry, parse_manifest, read_manifest_file

__all__ = ["DownloadError", "ManifestError", "OfflineError", "ZooEntry", "builtin_manifest",
           "entries", "entry", "home", "resolve"]
log = logging.getLogger("omnimask.zoo")
_REMOTE: dict[str, list[ZooEntry]] = {}  # URL manifests, read once per process


def builtin_manifest() -> Path:
    """The shipped manifest: the repository's ``zoo/manifest.json``, installed as the
    package ``omnimask.zoo.shipped`` (with the models it lists)."""
    from importlib import resources

    return Path(str(resources.files("omnimask.zoo.shipped") / "manifest.json"))


def _remote_manifest(url: str) -> list[ZooEntry]:
    """A manifest at a URL: fetched once per process and kept in the cache, which offline
    mode reads instead."""
    if url in _REMOTE:
        return _REMOTE[url]
    keep = home() / "zoo" / "manifests" / (hashlib.sha256(url.encode()).hexdigest()[:16]
                                           + ".json")
    where = f"zoo manifest {url}"
    if offline():
        if not keep.is_file():
            raise OfflineError(f"offline (OMNIMASK_OFFLINE/HF_HUB_OFFLINE) and {where} was "
                               "never read online; unset offline mode once")
        entries = parse_manifest(keep.read_bytes(), where, url)
    else:
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                text = r.read()
        except Exception as e:  # noqa: BLE001 - URLError, HTTPError, timeouts: one line
            raise ManifestError(f"{where} cannot be read ({getattr(e, 'reason', e)})") from None
        entries = parse_manifest(text, where, url)  # checked before it is kept
        from omnimask.safeio import atomic_write_bytes

        keep.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(keep, text)
    _REMOTE[url] = entries
    return entries


def manifest_sources() -> list[str]:
    shipped = builtin_manifest()
    out = [str(shipped)] if shipped.is_file() else []
    return out + [s.strip() for s in os.environ.get("OMNIMASK_ZOO", "").split(",") if s.strip()]


def entries() -> dict[str, ZooEntry]:
    """Every known entry by name (later manifests replace earlier entries of a name)."""
    out: dict[str, ZooEntry] = {}
    for src in manifest_sources():
        if src.startswith(("http://", "https://")):
            got = _remote_manifest(src)
        else:
            p = Path(src.removeprefix("file://"))
            if not p.is_file():
                raise ManifestError(f"OMNIMASK_ZOO: no manifest at {p}")
            got = read_manifest_file(p)
        for e in got:
            if e.name in out:
                log.info("zoo: %s from %s replaces the one from %s", e.name, src,
                         out[e.name].source)
            out[e.name] = e
    return out


def entry(name: str) -> ZooEntry:
    known = entries()
    if name not in known:
        near = difflib.get_close_matches(name, list(known), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else (
            f"; known: {', '.join(sorted(known))}" if known else
            "; no manifest lists any model (OMNIMASK_ZOO adds one)")
        raise OmnimaskError(f"no zoo model named {name!r}{hint} (omnimask zoo list)")
    return known[name]


def resolve(source: str | os.PathLike, root: str | os.PathLike | None = None,
            progress: bool | None = None) -> Path:
    """A local model directory for ``source``: an existing directory as it is; a zoo name
    downloaded into the cache (``root``, default ``$OMNIMASK_HOME``) and verified;
    ``hf://org/repo[@revision]`` through huggingface_hub's cache."""
    s = str(source)
    if s.startswith("hf://"):
        return _hub_snapshot(s)
    p = Path(s)
    if p.is_dir():
        return p
    if "/" in s and s.count("/") == 1 and not s.startswith((".", "/", "~")):
        return fetch_entry(entry(s), Path(root) if root else None, progress)
    raise OmnimaskError(f"no model directory at {s} (nor a zoo name 'org/model' or "
                        "hf://org/repo)")


def _hub_snapshot(url: str) -> Path:
    repo, rev, sub = split_hf(url)
    from huggingface_hub import snapshot_download

    try:
        d = Path(snapshot_download(repo_id=repo, revision=rev, local_files_only=offline()))
    except Exception as e:  # noqa: BLE001 - the hub's many errors, as one line
        if offline():
            raise OfflineError(f"offline (OMNIMASK_OFFLINE/HF_HUB_OFFLINE) and {url} is not "
                               "in the Hugging Face cache; download it once online") from None
        first = str(e).splitlines()[0] if str(e) else ""
        raise OmnimaskError(f"{url}: {type(e).__name__}: {first}") from None
    return d / sub if sub else d
