"""A pretraining run's checkpoint as a portable model directory (``omnimask/pretrained.py``).

``export_run(run_dir, out, which)`` rebuilds the run's model from its ``config.yaml``,
loads a complete checkpoint (verified against its ``COMPLETE`` marker), checks that the
tokenizers the config names are the ones the run was trained with (``tokenizers.json``
fingerprints, and the vocabulary they give), and writes ``out`` with
``save_pretrained``: weights, config, ``omnimask_vocab.json`` and the tokenizers copied in.

``which``: ``final`` (the newest checkpoint that loads), ``best`` (of the checkpoints
kept, the one whose step has the lowest mean validation loss over the objectives in
``metrics.jsonl``), or a checkpoint name (``step_00001800``) or step. ``ema=True`` exports
the exponential moving average the checkpoint carries (``trainer.ema`` > 0; validation
measured those weights) instead of the live weights (what ``samples`` generated with).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from omnimask.errors import OmnimaskError

from . import checkpoint as ckpt


def best_checkpoint(run: Path) -> Path:
    """The kept checkpoint whose step has the lowest mean validation loss."""
    done = {ckpt.step_of(p): p for p in ckpt.complete(run / "checkpoints")}
    scores = {}
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text(errors="replace").splitlines() if metrics.is_file() else []
    for ln in lines:
        try:
            row = json.loads(ln)
        except ValueError:  # a line torn by a kill
            continue
        losses = row.get("losses") if isinstance(row, dict) and row.get("split") == "val" else None
        if losses and row.get("step") in done:
            scores[row["step"]] = sum(losses.values()) / len(losses)
    if not scores:
        raise OmnimaskError(f"no checkpoint kept in {run / 'checkpoints'} has a validation row "
                            f"in {metrics}; export which=final instead")
    return done[min(scores, key=lambda s: (scores[s], -s))]


def _checkpoint(run: Path, which: str) -> tuple[Path, dict, dict]:
    root = run / "checkpoints"
    if which == "final":
        found = ckpt.load_newest(root)
        if found is None:
            raise OmnimaskError(f"{run} has no complete checkpoint in {root}")
        return found
    if which == "best":
        path = best_checkpoint(run)
    else:
        path = root / (f"step_{int(which):08d}" if str(which).isdigit() else str(which))
        if path.parent != root or not (path / ckpt.MARKER).is_file():
            known = ", ".join(p.name for p in ckpt.complete(root)) or "none"
            raise OmnimaskError(f"{run}: no complete checkpoint {which!r} (final, best or one "
                                f"of: {known})")
    return (path, *ckpt.load(path))


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, which: str = "final",
               ema: bool = False) -> Path:
    """Write the model directory ``out`` from run ``run_dir``'s checkpoint ``which``."""
    from omnimask.config import load_config
    from omnimask.modalities.vocab import Vocab
    from omnimask.model import OmniModel
    from omnimask.pretrained import KINDS, check_tokenizers

    from .objectives.base import pretraining_heads
    from .pretrain import PretrainConfig, load_tokenizers
    from .trainer import load_weights

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise OmnimaskError(f"{run} is not a pretraining run directory (no config.yaml)")
    # the device it trained on does not matter here (a GPU run exported on a laptop)
    cfg = load_config(PretrainConfig, run / "config.yaml", ["trainer.device=cpu"])
    if not (run / "vocab.json").is_file():
        raise OmnimaskError(f"{run / 'vocab.json'} is missing: the run never started training")
    vocab = Vocab.load(run / "vocab.json")
    _check_tokenizer_ids(run, cfg.tokenizers)
    check_tokenizers(load_tokenizers(cfg.tokenizers), vocab,
                     f"tokenizers of {run / 'config.yaml'}")
    path, sd, st = _checkpoint(run, which)
    model = OmniModel(cfg.model, pretraining_heads(cfg.objectives))
    load_weights(model, sd, str(path))
    if ema:
        if not st.get("ema"):
            raise OmnimaskError(f"{path} has no EMA weights (the run had trainer.ema=0)")
        live = model.state_dict()
        with torch.no_grad():  # into the tensors: the tied vocabulary head follows
            for k, v in st["ema"].items():
                live[k].copy_(v)
    model.vocab = vocab
    tokenizers = {k: getattr(cfg.tokenizers, k) for k in KINDS if getattr(cfg.tokenizers, k)}
    return model.save_pretrained(out, tokenizers)


def _check_tokenizer_ids(run: Path, paths) -> None:
    """The tokenizer directories still hold what the run trained with (its fingerprints)."""
    from omnimask.modalities.vocab import VocabMismatch

    from .corpus import tokenizer_id
    from .pretrain import TOKENIZER_IDS

    saved = run / TOKENIZER_IDS
    if not saved.is_file():  # a run from before fingerprints: the vocabulary check remains
        return
    before = json.loads(saved.read_text())
    for kind, want in before.items():
        got = tokenizer_id(getattr(paths, kind, None))
        if got != want:
            raise VocabMismatch(f"tokenizers.{kind} ({getattr(paths, kind, None)}) is not the "
                                f"tokenizer {run} was trained with (fingerprint {got or 'none'}"
                                f", the run recorded {want or 'none'} in {saved})")
