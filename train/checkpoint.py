"""Checkpoints that are never half-loaded and never run code.

``save`` writes ``<dir>/step_XXXXXXXX.tmp/`` (weights in ``model.safetensors``, the rest
of the state in ``state.safetensors``, a tree file: tensors plus JSON, no pickle), fsyncs
both, writes the ``COMPLETE`` marker last (JSON: the step, and each file's size and
SHA-256), fsyncs the folder and renames it into place. ``load`` verifies every file
against the marker before reading it. ``load_newest`` falls back to the previous complete
checkpoint, with a warning naming both, when the newest one fails to load (truncated or
altered after it was written).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from omnimask.errors import OmnimaskError
from omnimask.safeio import UnreadableFile, fsync_path, load_tree, save_tree, sha256_file

MARKER = "COMPLETE"
WEIGHTS, STATE = "model.safetensors", "state.safetensors"
log = logging.getLogger("omnimask.checkpoint")


def save(directory: str | os.PathLike, step: int, weights: dict[str, torch.Tensor],
         state: dict, keep: int = 2) -> Path:
    root = Path(directory)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    fsync_path(tmp / WEIGHTS)
    save_tree(tmp / STATE, state)
    files = {n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)}
             for n in (WEIGHTS, STATE)}
    with open(tmp / MARKER, "w") as f:
        f.write(json.dumps({"step": step, "files": files}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(root)
    for old in complete(root)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(directory: str | os.PathLike) -> list[Path]:
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / MARKER).is_file())


def step_of(path: str | os.PathLike) -> int:
    return int(Path(path).name.split("_")[1])


def latest(directory: str | os.PathLike) -> Path | None:
    done = complete(directory)
    return done[-1] if done else None


def verify(path: str | os.PathLike) -> None:
    """Every file the marker lists has its recorded size and SHA-256; else ``UnreadableFile``."""
    p = Path(path)
    if not (p / MARKER).is_file():
        raise UnreadableFile(f"{p} is not a complete checkpoint (no {MARKER} marker)")
    try:
        files = json.loads((p / MARKER).read_text())["files"]
    except (ValueError, KeyError, TypeError):
        if (p / "state.pt").exists():
            raise UnreadableFile(f"{p} was written by an older omnimask (state.pt, a pickle, "
                                 "which is never loaded): start a new run directory") from None
        raise UnreadableFile(f"{p}/{MARKER} is not a checkpoint marker") from None
    for name, want in files.items():
        f = p / name
        if not f.is_file():
            raise UnreadableFile(f"{f} is missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise UnreadableFile(f"{f} has {size} bytes, the checkpoint recorded {want['bytes']}")
        got = sha256_file(f)
        if got != want["sha256"]:
            raise UnreadableFile(f"{f} has SHA-256 {got}, the checkpoint recorded "
                                 f"{want['sha256']}")


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and state of the checkpoint at ``path``, verified against its marker."""
    p = Path(path)
    verify(p)
    return load_file(str(p / WEIGHTS)), load_tree(p / STATE)


def load_newest(directory: str | os.PathLike
                ) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """The newest complete checkpoint that loads, falling back past damaged ones."""
    tried: list[str] = []
    for p in reversed(complete(directory)):
        try:
            sd, st = load(p)
        except UnreadableFile as e:
            log.warning("checkpoint %s does not load (%s); trying the previous one", p, e)
            tried.append(str(p))
            continue
        if tried:
            log.warning("resuming from %s instead of the damaged %s", p, ", ".join(tried))
        return p, sd, st
    if tried:
        raise OmnimaskError(f"no checkpoint in {directory} loads (damaged: {', '.join(tried)})")
    return None
