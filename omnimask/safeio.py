"""Files the project loads without running code in them, written so a crash never leaves
half a file behind.

``save_tree`` / ``load_tree`` store a nested structure of dicts, lists, tuples, numbers,
strings, numpy arrays and tensors in one safetensors file: the tensors as tensors, the
rest as tagged JSON in the file's metadata. Loading parses JSON and raw tensor bytes
only; it never unpickles (optimizer states, RNG states and corpora all go this way).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import OmnimaskError

TREE_KEY = "omnimask.tree"
_CHUNK = 1 << 20


class UnreadableFile(OmnimaskError):
    """A file the project wrote earlier cannot be read back (truncated, altered, foreign)."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a directory's entries after a rename, to disk. For a directory it
    is best effort: not every filesystem can fsync one."""
    is_dir = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not is_dir:
            raise


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` a fresh temporary file in ``path``'s folder (created exclusively, so
    a planted symlink is never followed), fsync it, rename it onto ``path``, fsync the
    folder. A crash leaves the old file or the new one, never half of one."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(p.parent)
    return p


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a tree file")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_tree(path: str | os.PathLike, tree: Any) -> Path:
    """Store ``tree`` in one safetensors file at ``path`` (atomically, fsynced)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(_encode(tree, tensors), allow_nan=True)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={TREE_KEY: meta}))


def load_tree(path: str | os.PathLike) -> Any:
    """The structure ``save_tree`` stored; ``UnreadableFile`` naming ``path`` otherwise."""
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = (f.metadata() or {}).get(TREE_KEY)
        if meta is None:
            raise UnreadableFile(f"{p} is not an omnimask tree file (no '{TREE_KEY}' metadata)")
        return _decode(json.loads(meta), load_file(str(p)))
    except UnreadableFile:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise UnreadableFile(f"{p} cannot be read ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'damaged'})") from None


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Extract a tar archive into ``dest``: regular files and folders only. An absolute
    path, a ``..`` part, a link or a device anywhere in it refuses the whole archive
    before anything is written; returns the member names."""
    import tarfile

    a, d = Path(archive), Path(dest)
    try:
        with tarfile.open(a) as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name).parts
                if (m.name.startswith(("/", "\\")) or Path(m.name).is_absolute()
                        or ".." in parts or "\\" in m.name):
                    raise UnreadableFile(f"{a}: member {m.name!r} points outside the folder; "
                                         "nothing was extracted")
                if not (m.isfile() or m.isdir()):
                    raise UnreadableFile(f"{a}: member {m.name!r} is a link or device; "
                                         "nothing was extracted")
            d.mkdir(parents=True, exist_ok=True)
            tar.extractall(d, members=members, filter="data")
    except tarfile.TarError as e:
        raise UnreadableFile(f"{a} is not a readable tar archive ({e})") from None
    return [m.name for m in members]


def versioned_json(text: str | bytes, where: str, fmt: str, newest: int, what: str,
                   error: type[Exception] = OmnimaskError) -> dict:
    """A JSON object tagged ``{"format": fmt, "format_version": N}`` with 1 <= N <=
    ``newest``; else ``error`` naming ``where`` (a newer version asks for an upgrade)."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{where} is not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise error(f"{where} is not an omnimask {what} (no \"format\": \"{fmt}\")")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise error(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > newest:
        raise error(f"{where} has format version {version}, written by a newer omnimask; "
                    f"this one reads up to version {newest}: upgrade omnimask")
    return doc
