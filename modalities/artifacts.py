"""A tokenizer directory: a JSON of metadata beside a safetensors file of tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from omnimask.errors import OmnimaskError


def save_artifact(directory: str | os.PathLike, meta_name: str, meta: dict, weights_name: str,
                  tensors: dict[str, torch.Tensor]) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / weights_name))
    (d / meta_name).write_text(json.dumps(meta, indent=2) + "\n")
    return d


def load_artifact(directory: str | os.PathLike, meta_name: str, weights_name: str, what: str
                  ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors); an error naming ``what`` if either file is missing."""
    d = Path(directory)
    if not (d / meta_name).is_file() or not (d / weights_name).is_file():
        raise OmnimaskError(f"{d} is not {what} (needs {meta_name} and {weights_name})")
    return json.loads((d / meta_name).read_text()), load_file(str(d / weights_name))


def code_stats(ids: torch.Tensor, size: int) -> dict:
    """Codebook usage (fraction of codes used) and perplexity (exp of the code entropy)."""
    counts = torch.bincount(ids.flatten(), minlength=size).float()
    p = counts / counts.sum().clamp_min(1)
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).float().mean()), "perplexity": float(ent.exp())}
