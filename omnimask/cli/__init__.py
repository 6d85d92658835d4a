"""The ``omnimask`` command. ``main(argv)`` is callable from tests.

One module per command group (``data``, ``tokenizer``, ``bench``, ``pretrain``,
``finetune``, ``evaluate`` for ``eval``, ``export``, ``zoo``, ``demo``, ``listing`` for
``list``), each with ``add_parser(sub)`` and its ``cmd_*`` functions; this module builds the parser
from them, splits the ``key=value`` overrides and turns errors into one line.
Every subcommand exits non-zero with a one-line cause on bad input (``EXIT_*`` below);
``--debug`` or ``OMNIMASK_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings

from ..config import check_override
from ..errors import Interrupted, OmnimaskError
from . import (
    bench,
    data,
    demo,
    evaluate,
    export,
    finetune,
    listing,
    pretrain,
    submit,
    tokenizer,
    zoo,
)
from .common import (
    EXIT_BAD_INPUT,
    EXIT_CTRL_C,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    QUIET,
    _at_least,
    _check_out_dir,
    _write_json,
)

__all__ = ["EXIT_BAD_INPUT", "EXIT_CTRL_C", "EXIT_FAILED", "EXIT_INTERRUPTED", "QUIET",
           "_at_least", "_check_out_dir", "_write_json", "build_parser", "main"]

# the command groups in the order --help lists them
GROUPS = (data, tokenizer, bench, pretrain, finetune, submit, evaluate, export, zoo, demo,
          listing)
EPILOG = (f"exit status: 0 done; {EXIT_FAILED} failed (data inspect --strict found problems, "
          f"a demo stage failed, an unexpected error); {EXIT_BAD_INPUT} bad input (argument, "
          f"config key, file or directory: named in one line); {EXIT_INTERRUPTED} interrupted "
          f"by SIGTERM or SIGUSR2 after saving a checkpoint: run the same command again to "
          f"resume; {EXIT_CTRL_C} Ctrl-C. --debug (anywhere) or OMNIMASK_DEBUG=1: a traceback "
          "instead of the one-line error.")


def _version() -> str:
    """The installed distribution's version; the package's own outside an install."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("omnimask")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnimask",
                                description="omnimask: multimodal masked foundation models.",
                                epilog=EPILOG)
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (anywhere on the line; also "
                        "OMNIMASK_DEBUG=1)")
    p.add_argument("--version", action="version", version=f"omnimask {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parser(sub)
    _show_defaults(p)
    return p


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's help ends with its default, unless it already names one (all the
    subcommands' parsers too)."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for child in a.choices.values():
                _show_defaults(child)
        elif (a.option_strings and a.help is not argparse.SUPPRESS and a.nargs != 0
              and not any(a.default is v for v in (None, False, argparse.SUPPRESS))
              and a.default != []
              and "default" not in (a.help or "").lower()):
            a.help = f"{a.help} (default: %(default)s)" if a.help else "default: %(default)s"


def _leaf(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser the command line selects, followed through the subcommand names."""
    p = parser
    for t in argv:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        p = subs[0].choices.get(t, p)
    return p


def _split_overrides(leaf: argparse.ArgumentParser, argv: list[str]) -> tuple[list, list]:
    """(argv without the overrides, the overrides): every token with "=" that is neither an
    option nor an option's value, wherever it stands (argparse would bind positionals too
    early); malformed ones included, so that they are reported, not dropped."""
    takes_value = {s for a in leaf._actions if a.option_strings and a.nargs != 0
                   for s in a.option_strings}
    rest, overrides = [], []
    for k, t in enumerate(argv):
        is_value = k > 0 and argv[k - 1] in takes_value
        (overrides if "=" in t and not t.startswith("-") and not is_value else rest).append(t)
    return rest, overrides


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _describe(e: Exception) -> tuple[int, str]:
    """(exit status, one-line message) of an error that reached the command boundary."""
    if isinstance(e, OmnimaskError):
        return EXIT_BAD_INPUT, _one_line(e)
    if isinstance(e, OSError) and e.strerror:  # unwritable/missing/full: name the path
        where = ", ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return EXIT_BAD_INPUT, f"{where}: {e.strerror}" if where else e.strerror
    if isinstance(e, (OSError, ValueError)):
        return EXIT_BAD_INPUT, _one_line(e)
    return EXIT_FAILED, (f"unexpected {type(e).__name__}: {_one_line(e)} (run with --debug "
                         "for the traceback)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["submit"]:  # its own --debug (submitit's executor); the job keeps its own
        debug = os.environ.get("OMNIMASK_DEBUG", "") not in ("", "0")
    else:
        debug = "--debug" in argv or os.environ.get("OMNIMASK_DEBUG", "") not in ("", "0")
        argv = [t for t in argv if t != "--debug"]
    parser = build_parser()
    leaf = _leaf(parser, argv)
    overrides: list[str] = []
    if any(a.dest == "overrides" for a in leaf._actions):
        argv, overrides = _split_overrides(leaf, argv)
        args, stray = parser.parse_known_args(argv)
        if any(t.startswith("-") for t in stray):
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        # positionals without "=" (bound by argparse or left over): keys without a value
        overrides = [*args.overrides, *stray, *overrides]
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with _quiet(bool(getattr(args, "quiet", False))):
        return _run(args, overrides, debug)


@contextlib.contextmanager
def _quiet(on: bool):
    """-q: no progress bars (each command's), and only errors: no warnings from omnimask's
    loggers or Python's warnings from the libraries, for the command's duration."""
    if not on:
        yield
        return
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _run(args: argparse.Namespace, overrides: list[str], debug: bool) -> int:
    try:
        if hasattr(args, "overrides"):
            for t in overrides:
                check_override(t)
            args.overrides = overrides
        return args.fn(args)
    except Interrupted as e:
        print(f"omnimask: {_one_line(e)}; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("omnimask: interrupted", file=sys.stderr)
        return EXIT_CTRL_C
    except Exception as e:
        if debug:
            raise
        code, msg = _describe(e)
        print(f"omnimask: error: {msg}", file=sys.stderr)
        return code
