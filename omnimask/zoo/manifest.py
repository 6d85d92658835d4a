"""Zoo manifests: JSON files naming models and the files that make each one.

::

    {"format": "omnimask-zoo", "format_version": 1,
     "models": [{"name": "omnimask/shapes-tiny-vqa", "description": "...",
                 "tasks": ["vqa"], "architecture": "omnimask-tiny", "license": "...",
                 "files": [{"path": "model.safetensors", "url": "...", "sha256": "...",
                            "size": 123}, ...],   # "extract": true unpacks a tar
                 "metrics": [<eval JSON>, ...], "recipe": {"command": ..., ...}}]}

A file's ``url`` is ``https://``/``http://``, ``file://``, ``hf://org/repo/path`` or a
path relative to the manifest (the repository's own ``zoo/``). ``path`` is where the file
lies in the model directory. Validation names the manifest and the key at fault.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from omnimask.errors import OmnimaskError

FORMAT, FORMAT_VERSION = "omnimask-zoo", 1
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
SCHEMES = ("http://", "https://", "file://", "hf://")


class ManifestError(OmnimaskError):
    """A manifest is unreadable or an entry breaks the format; the message names both."""


def safe_relpath(path: str, where: str) -> str:
    """``path`` as a relative POSIX path inside a folder: no absolute path, drive, ``..``,
    empty or hidden part, backslash or control character (a file never lands outside)."""
    bad = (not isinstance(path, str) or not path or "\\" in path or path.startswith("/")
           or any(ord(c) < 32 for c in path) or re.match(r"^[A-Za-z]:", path))
    parts = path.split("/") if not bad else ()
    if bad or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise ManifestError(f"{where}: {path!r} is not a safe relative path")
    return path


@dataclasses.dataclass(frozen=True)
class ZooFile:
    path: str  # inside the model directory
    url: str
    sha256: str
    size: int
    extract: bool = False  # a tar archive unpacked into the model directory


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    files: tuple[ZooFile, ...]
    description: str = ""
    tasks: tuple[str, ...] = ()
    architecture: str = ""
    license: str = ""
    metrics: tuple[dict, ...] = ()  # eval JSONs
    recipe: dict = dataclasses.field(default_factory=dict)
    source: str = ""  # the manifest it came from: relative URLs resolve against it

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def headline(self) -> str:
        """Each evaluation's headline metric, e.g. ``vqa accuracy 0.748 (test)``."""
        out = []
        for ev in self.metrics:
            m = ev.get("metrics", {})
            key = next((k for k in HEADLINE.get(ev.get("task"), ()) if k in m), None)
            if key is not None and isinstance(m[key], (int, float)):
                out.append(f"{ev['task']} {key} {m[key]:.3f} ({ev.get('split', '?')})")
        return ", ".join(dict.fromkeys(out))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        for f in d["files"]:
            if not f["extract"]:
                del f["extract"]
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# the metric ``zoo list`` shows for each task
HEADLINE = {"pretrain": ("mlm_loss",), "vqa": ("accuracy",), "retrieval": ("t2i_r10", "t2i_r1"), "caption": ("cider",),
            "segment": ("miou",), "refer": ("miou",)}


def _field(d: dict, key: str, kind: type | tuple, where: str, default: Any = None) -> Any:
    if key not in d:
        if default is None:
            raise ManifestError(f"{where}: '{key}' is missing")
        return default
    v = d[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}: '{key}' must be a {name}, got {type(v).__name__}")
    return v


def parse_entry(d: Any, where: str, source: str = "") -> ZooEntry:
    if not isinstance(d, dict):
        raise ManifestError(f"{where} must be a JSON object")
    name = _field(d, "name", str, where)
    if not NAME_RE.match(name):
        raise ManifestError(f"{where}: name {name!r} is not 'org/model' (lowercase letters, "
                            "digits, '.', '_', '-')")
    where = f"{where} ({name})"
    files, seen = [], set()
    for i, f in enumerate(_field(d, "files", list, where)):
        fw = f"{where}: files[{i}]"
        if not isinstance(f, dict):
            raise ManifestError(f"{fw} must be a JSON object")
        path = safe_relpath(_field(f, "path", str, fw), fw)
        if path in seen:
            raise ManifestError(f"{fw}: {path!r} is listed twice")
        seen.add(path)
        url = _field(f, "url", str, fw)
        if "://" in url and not url.startswith(SCHEMES):
            raise ManifestError(f"{fw}: url {url!r}: scheme not supported "
                                f"({', '.join(SCHEMES)} or a relative path)")
        if "://" not in url:
            safe_relpath(url, f"{fw}: url")
        sha = _field(f, "sha256", str, fw)
        if not SHA_RE.match(sha):
            raise ManifestError(f"{fw}: sha256 must be 64 lowercase hex digits")
        size = _field(f, "size", int, fw)
        if size < 0:
            raise ManifestError(f"{fw}: size must be >= 0")
        extract = _field(f, "extract", bool, fw, False)
        if extract and not path.endswith((".tar", ".tar.gz", ".tgz")):
            raise ManifestError(f"{fw}: extract needs a .tar, .tar.gz or .tgz file")
        files.append(ZooFile(path, url, sha, size, extract))
    if not any(f.extract for f in files) and not {"config.json", "model.safetensors"} <= seen:
        raise ManifestError(f"{where}: files must include config.json and model.safetensors "
                            "(or an archive with extract: true)")
    metrics = _field(d, "metrics", list, where, [])
    if not all(isinstance(m, dict) for m in metrics):
        raise ManifestError(f"{where}: 'metrics' must be a list of eval JSON objects")
    return ZooEntry(name=name, files=tuple(files),
                    description=_field(d, "description", str, where, ""),
                    tasks=tuple(_field(d, "tasks", list, where, [])),
                    architecture=_field(d, "architecture", str, where, ""),
                    license=_field(d, "license", str, where, ""),
                    metrics=tuple(metrics), recipe=_field(d, "recipe", dict, where, {}),
                    source=source)


def parse_manifest(text: str | bytes, where: str, source: str = "") -> list[ZooEntry]:
    """The entries of a manifest's text; ``where`` names it in errors, ``source`` (its path
    or URL) is what relative file URLs resolve against."""
    from omnimask.safeio import versioned_json

    doc = versioned_json(text, where, FORMAT, FORMAT_VERSION, "zoo manifest", ManifestError)
    models = _field(doc, "models", list, where)
    entries = [parse_entry(m, f"{where}: models[{i}]", source) for i, m in enumerate(models)]
    names = [e.name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ManifestError(f"{where}: {', '.join(dup)} listed twice")
    return entries


def dump_manifest(entries: list[ZooEntry]) -> str:
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION,
           "models": [e.to_dict() for e in sorted(entries, key=lambda e: e.name)]}
    return json.dumps(doc, indent=1) + "\n"


def read_manifest_file(path: Path) -> list[ZooEntry]:
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"zoo manifest {path} cannot be read ({e.strerror})") from None
    return parse_manifest(text, f"zoo manifest {path}", str(path.resolve()))
