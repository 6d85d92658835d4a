"""``omnimask submit``: a pretraining or fine-tuning command as a preemptible SLURM job."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import OmnimaskError
from .common import _at_least

COMMANDS = ("pretrain", "finetune")  # commands that write a resumable run directory


def run_dir_of(argv: list[str]) -> Path:
    """The run directory a ``pretrain``/``finetune`` command line writes (its config's
    ``out`` after ``--out`` and the overrides); config errors surface here, at submission."""
    from ..config import load_config
    from . import _leaf, _split_overrides, build_parser

    if not argv or argv[0] not in COMMANDS:
        raise OmnimaskError(f"omnimask submit runs {' or '.join(COMMANDS)}, got "
                            f"{argv[0] if argv else 'no command'!r}")
    parser = build_parser()
    head, tail = _split_overrides(_leaf(parser, argv), argv)
    args, stray = parser.parse_known_args(head)
    values = {"out": args.out} if args.out else {}
    if argv[0] == "pretrain":
        from ..train.pretrain import PretrainConfig as schema
    else:
        from ..train.finetune import FinetuneConfig as schema

        values["task"] = args.task
        if args.init:
            values["init"] = args.init
    cfg = load_config(schema, args.config, [*args.overrides, *stray, *tail], **values)
    return Path(cfg.out).absolute()


def submit(argv: list[str], o, sweep: list[list[str]] | None = None) -> list[tuple]:
    """Submit ``omnimask ARGV`` (one job, or a job array: one task per override set, each
    writing ``RUN/<index>``); returns (job, run directory) pairs."""
    from ..train.slurm import CommandJob, executor
    from . import main

    base = run_dir_of(argv)
    if sweep is None:
        runs = [(argv, base)]
    else:
        runs = [([*argv, *ovr, f"out={base / str(i)}"], base / str(i))
                for i, ovr in enumerate(sweep)]
        for args, _ in runs:  # every override set must load: errors now, not in the queue
            run_dir_of(args)
    base.mkdir(parents=True, exist_ok=True)
    ex = executor(base / "submitit", o)
    if len(runs) == 1 or o.executor == "debug":
        jobs = [ex.submit(CommandJob(main, args)) for args, _ in runs]
    else:
        with ex.batch():
            jobs = [ex.submit(CommandJob(main, args)) for args, _ in runs]
    return list(zip(jobs, [r for _, r in runs], strict=True))


def cmd_submit(a: argparse.Namespace) -> int:
    from ..train.slurm import SubmitOptions, load_sweep

    if not a.job or a.job[0] not in COMMANDS:
        raise OmnimaskError("omnimask submit needs the command to run: pretrain ... or "
                            "finetune ... (after the submit options)")
    _at_least(("--nodes", a.nodes, 1), ("--tasks-per-node", a.tasks_per_node, 1),
              ("--cpus-per-task", a.cpus_per_task, 1), ("--time", a.time, 1),
              ("--gpus-per-node", a.gpus_per_node, 0), ("--signal-delay", a.signal_delay, 0),
              ("--max-requeues", a.max_requeues, 0))
    if a.local and a.debug:
        raise OmnimaskError("--local and --debug exclude each other")
    o = SubmitOptions(nodes=a.nodes, tasks_per_node=a.tasks_per_node,
                      gpus_per_node=a.gpus_per_node, cpus_per_task=a.cpus_per_task,
                      mem_gb=a.mem_gb, partition=a.partition, time_min=a.time,
                      account=a.account, qos=a.qos, constraint=a.constraint,
                      signal_delay_s=a.signal_delay, max_requeues=a.max_requeues,
                      name=a.name or f"omnimask-{a.job[0]}",
                      executor="local" if a.local else "debug" if a.debug else "slurm")
    sweep = load_sweep(a.array) if a.array else None
    jobs = submit(a.job, o, sweep)
    if a.json:  # for scripts: the jobs, nothing else
        print(json.dumps([{"job_id": j.job_id, "run": str(r), "stdout": str(j.paths.stdout),
                           "stderr": str(j.paths.stderr)} for j, r in jobs]))
        return 0
    for job, run in jobs:
        print(f"job {job.job_id}: {run}")
        print(f"  follow: tail -f {job.paths.stderr}  (progress and logs; stdout: "
              f"{job.paths.stdout})")
    if a.wait:
        failed = 0
        for job, run in jobs:
            try:
                job.results()  # every task's
                print(f"job {job.job_id} done: {run}")
            except Exception as e:  # noqa: BLE001 (submitit re-raises the job's error)
                failed += 1
                print(f"job {job.job_id} failed: {str(e).strip().splitlines()[-1]}")
        return 1 if failed else 0
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="run pretrain/finetune as a SLURM job (submitit), preemptible",
        description="Submit `omnimask pretrain|finetune ...` to SLURM through submitit. "
        "Every task is one rank (set trainer.parallel=ddp or fsdp for more than one). On "
        "SIGUSR2 (--signal-delay seconds before --time runs out) or a requeue, all ranks "
        "save a checkpoint at the same step; the job is requeued and resumes from it. "
        "Logs: RUN/submitit/. Example: omnimask submit --tasks-per-node 2 --time 120 "
        "pretrain --config shapes_tiny trainer.parallel=ddp")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tasks-per-node", type=int, default=1, help="ranks per node")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--mem-gb", type=float, help="memory per node")
    p.add_argument("--partition")
    p.add_argument("--time", type=int, default=60, help="time limit in minutes")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--signal-delay", type=int, default=90,
                   help="seconds before the time limit at which SIGUSR2 asks for a checkpoint")
    p.add_argument("--max-requeues", type=int, default=10,
                   help="requeues after time-outs before the job gives up")
    p.add_argument("--array", metavar="SWEEP.yaml",
                   help="a job array: a YAML list of override sets, each run in RUN/<index>")
    p.add_argument("--name", help="job name (default omnimask-<command>)")
    p.add_argument("--local", action="store_true",
                   help="submitit's local executor: processes on this machine, no SLURM")
    p.add_argument("--debug", action="store_true",
                   help="submitit's debug executor: in this process, for a debugger")
    p.add_argument("--wait", action="store_true", help="wait for the jobs and report")
    p.add_argument("--json", action="store_true",
                   help="print only the jobs as JSON (job_id, run, stdout, stderr)")
    p.add_argument("job", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help="pretrain|finetune and their arguments")
    p.set_defaults(fn=cmd_submit)
