"""``omnimask demo``: the main job on ShapesWorld (``omnimask/demo.py``)."""

from __future__ import annotations

import argparse

from ..errors import Interrupted
from .common import EXIT_FAILED, QUIET, _check_out_dir


def cmd_demo(a: argparse.Namespace) -> int:
    from ..config import DemoConfig, load_config, to_yaml
    from ..demo import run_demo

    values = {"out": a.out} if a.out else {}
    cfg = load_config(DemoConfig, a.config, a.overrides, **values)
    if a.print_config:  # the resolved config; nothing is run or written
        print(to_yaml(cfg), end="")
        return 0
    _check_out_dir(cfg.out, "--out" if a.out else "out")
    report = run_demo(cfg, quick=a.quick, progress=not a.quiet)
    status = report["metrics"].get("pretrain", {}).get("status", "")
    if status.startswith("interrupted"):
        raise Interrupted(f"demo pretraining {status}; checkpoint saved in "
                          f"{report['metrics']['pretrain']['checkpoint']}")
    return 0 if all(s["status"] == "ok" for s in report["stages"].values()) else EXIT_FAILED


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", parents=[QUIET], help="the main job on ShapesWorld",
                          description="Generate ShapesWorld, inspect it, read it through the "
                                      "pipeline, and write report.md/json and PNGs.")
    demo.add_argument("--out", help="run directory (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a few hundred samples only")
    demo.add_argument("--config", help="YAML with DemoConfig keys: a file, or a packaged "
                                       "config's name (demo/default; omnimask list configs)")
    demo.add_argument("--print-config", action="store_true",
                      help="print the resolved config as YAML and exit without running")
    demo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_train=500")
    demo.set_defaults(fn=cmd_demo)
