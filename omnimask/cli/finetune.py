"""``omnimask finetune TASK --init DIR|ZOO_NAME|scratch --config FILE``: fine-tune task heads."""

from __future__ import annotations

import argparse

from ..errors import Interrupted
from .common import EXIT_INTERRUPTED, QUIET, _check_out_dir, add_run_arguments

TASKS = ("vqa", "retrieval", "caption", "segment", "multitask")


def cmd_finetune(a: argparse.Namespace) -> int:
    from ..config import load_config, to_yaml
    from ..train.distributed import is_main
    from ..train.finetune import FinetuneConfig, Finetuning

    values = {"task": a.task}
    if a.out:
        values["out"] = a.out
    if a.init:
        values["init"] = a.init
    cfg = load_config(FinetuneConfig, a.config, a.overrides, **values)
    if a.print_config:
        print(to_yaml(cfg), end="")
        return 0
    _check_out_dir(cfg.out, "--out" if a.out else "out")
    summary = Finetuning(cfg, progress=not a.quiet).fit()
    if not is_main():  # rank 0 reports for all ranks
        return EXIT_INTERRUPTED if summary["status"].startswith("interrupted") else 0
    print(f"{summary['status']} at step {summary['step']} in {summary['elapsed_s']:.0f} s of "
          f"training; checkpoint {summary['checkpoint']}")
    if summary["status"].startswith("interrupted"):
        raise Interrupted(f"fine-tuning {summary['status']} at step {summary['step']}; "
                          f"checkpoint saved in {summary['checkpoint']}")
    best = summary.get("best", {})
    if best.get("metrics"):
        print(f"best validation {best['metric']} {best['score']:.4f} at step {best['step']}:")
        for k, v in best["metrics"].items():
            print(f"  {k:<28} {v:.4f}")
    print(summary["model"])
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    ft = sub.add_parser("finetune", parents=[QUIET], help="fine-tune task heads (vqa, "
                        "retrieval, caption, segment, multitask) on an encoder",
                        description="Fine-tune a task head (or all of them: multitask) on "
                        "a model directory's encoder or from scratch; writes a run directory "
                        "(resumable, metrics.jsonl, TensorBoard) and the best model by the "
                        "validation metric as RUN/model (a model directory); prints it last. "
                        f"SIGTERM/SIGUSR2: checkpoint and exit {EXIT_INTERRUPTED}; the same "
                        "command resumes.")
    ft.add_argument("task", choices=TASKS, help="the task to fine-tune")
    ft.add_argument("--init", help="a model directory (omnimask export), a zoo name "
                                   "(omnimask zoo list), hf://org/repo, or scratch "
                                   "(overrides the config's init)")
    add_run_arguments(ft, "FinetuneConfig", "shapes_tasks")
    ft.set_defaults(fn=cmd_finetune)
