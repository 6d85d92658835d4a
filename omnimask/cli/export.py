"""``omnimask export RUN_DIR --out DIR``: a pretraining run's checkpoint as a portable model
directory (``omnimask.train.export.export_run``; ``omnimask.load(DIR)`` reads it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import QUIET, _check_out_dir


def _size(path: Path) -> str:
    n = path.stat().st_size if path.is_file() else sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file())
    for unit in ("B", "kB", "MB"):
        if n < 1000 or unit == "MB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # not reached


def cmd_export(a: argparse.Namespace) -> int:
    from ..pretrained import TOKENIZERS
    from ..train.export import best_checkpoint, export_run

    _check_out_dir(a.out, "--out")
    out = export_run(a.run_dir, a.out, which=a.which, ema=a.ema)
    which = f"best, {best_checkpoint(Path(a.run_dir)).name}" if a.which == "best" else a.which
    print(f"exported {a.run_dir} (checkpoint {which}{', EMA weights' if a.ema else ''}):")
    for p in sorted(out.iterdir()):
        if p.name.startswith("."):
            continue
        kinds = f" ({', '.join(sorted(k.name for k in p.iterdir()))})" if (
            p.name == TOKENIZERS and p.is_dir()) else ""
        print(f"  {p.name + ('/' if p.is_dir() else ''):<20} {_size(p):>10}{kinds}")
    print(out)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", parents=[QUIET], help="a run's checkpoint as a portable model directory",
                        description="Write a pretraining run's checkpoint as a model "
                                    "directory (config.json, model.safetensors, omnimask_vocab.json, "
                                    "the tokenizers) that omnimask.load(DIR) reads without "
                                    "the run; prints what it holds, then the directory.")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="the run directory omnimask pretrain "
                                                       "wrote")
    ex.add_argument("--out", required=True, help="the model directory to write (new, empty "
                                                 "or an earlier export)")
    ex.add_argument("--which", default="final",
                    help="final (the newest checkpoint that loads, default), best (lowest "
                         "mean validation loss among those kept), a step or a checkpoint "
                         "name (step_00001800)")
    ex.add_argument("--ema", action="store_true",
                    help="the exponential moving average of the weights (trainer.ema > 0)")
    ex.set_defaults(fn=cmd_export)
