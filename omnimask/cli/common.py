"""What the command modules share: exit statuses, the ``-q`` parent parser, checks of
output directories and sizes, JSON results."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import OmnimaskError

EXIT_FAILED = 1  # data inspect --strict found problems, a demo stage failed, an unexpected error
EXIT_BAD_INPUT = 2  # a bad argument, config, file or directory: the message names it
EXIT_INTERRUPTED = 3  # SIGTERM/SIGUSR2: a checkpoint was saved, the same command resumes
EXIT_CTRL_C = 130

# the parent parser of every command that shows progress bars
QUIET = argparse.ArgumentParser(add_help=False)
QUIET.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars and no warnings (errors still print)")


def add_run_arguments(p: argparse.ArgumentParser, schema: str, example: str) -> None:
    """``--config``, ``--out``, ``--print-config`` and the ``key=value`` overrides of a
    command that writes a run directory from a config of ``schema``."""
    p.add_argument("--config", required=True,
                   help=f"YAML with {schema} keys: a file, or a packaged config's name "
                        f"({example}; omnimask list configs)")
    p.add_argument("--out", help="run directory (overrides the config's out)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit without running")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=50")


def _check_out_dir(path: str | os.PathLike, what: str) -> None:
    """An output directory the command can create or write into, else an error naming it;
    nothing is created here (a later config error leaves no trace)."""
    p = Path(path)
    for d in (p, *p.parents):  # the nearest existing one decides
        if not d.exists():
            continue
        if not d.is_dir():
            raise OmnimaskError(f"{what} {p}: {d} is a file, not a directory")
        if not os.access(d, os.W_OK | os.X_OK):
            raise OmnimaskError(f"{what} {p}: {d} is not writable")
        return


def _at_least(*checks: tuple[str, int, int]) -> None:
    """(flag, value, lowest allowed) triples: an error naming the first flag below it."""
    for flag, v, lo in checks:
        if v < lo:
            raise OmnimaskError(f"{flag} must be >= {lo}, got {v}")


def _write_json(obj: dict, out: str | None) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        print(f"wrote {path}")
    else:
        sys.stdout.write(text)
