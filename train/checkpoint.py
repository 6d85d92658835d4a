"""Checkpoints that are never half-loaded.

``save`` writes ``<dir>/step_XXXXXXXX.tmp/`` (weights as safetensors, the rest of the state
with ``torch.save``), writes a ``COMPLETE`` marker last, then renames the folder into
place. ``latest`` returns the newest folder that has the marker; anything else (a crash
mid-write) is ignored.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"


def save(directory: str | os.PathLike, step: int, weights: dict[str, torch.Tensor],
         state: dict, keep: int = 2) -> Path:
    root = Path(directory)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / MARKER).write_text(f"{step}\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in complete(root)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(directory: str | os.PathLike) -> list[Path]:
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / MARKER).is_file())


def latest(directory: str | os.PathLike) -> Path | None:
    done = complete(directory)
    return done[-1] if done else None


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    p = Path(path)
    if not (p / MARKER).is_file():
        raise FileNotFoundError(f"{p} is not a complete checkpoint (no {MARKER} marker)")
    return load_file(str(p / "model.safetensors")), torch.load(p / "state.pt", weights_only=False)
