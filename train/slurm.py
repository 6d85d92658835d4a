"""``omnimask submit``: a training command as a SLURM job through submitit, preemptible.

The job is an omnimask command line (``pretrain ...`` or ``finetune ...``) run in every
task of the allocation: submitit's ``JobEnvironment`` gives each task its rank
(``distributed.export_submitit_env``), the command's trainer joins the process group.
Preemption: on SIGUSR2 (sent ``--signal-delay`` seconds before the time limit) or SIGTERM
(``scontrol requeue``, a preempting job) the trainer of every rank saves a checkpoint at
the same next step and stops; after a SIGUSR2 rank 0 hands over to submitit, which
requeues the job (``Checkpointable``); a SIGTERM requeue is SLURM's own. The requeued job
runs the same command, which resumes (``trainer.resume=auto``) from the newest complete
checkpoint. submitit stores the job as a pickle it writes and reads itself, in
``RUN/submitit`` beside its logs; omnimask never loads a pickle from anywhere else.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from omnimask.errors import ConfigError, OmnimaskError

log = logging.getLogger("omnimask.slurm")
INTERRUPTED = 3  # a command's exit status after a checkpoint on a stop signal


class CommandJob:
    """The callable submitit pickles: ``main(argv)`` (the omnimask command line, passed
    in by reference) in this task, with the torchrun variables set from SLURM.
    Checkpointable: submitit requeues it as it is."""

    def __init__(self, main: Callable[[list[str]], int], argv: list[str]) -> None:
        self.main, self.argv = main, list(argv)

    def __call__(self) -> int:
        from omnimask import stopsignals

        from . import distributed

        env = distributed.export_submitit_env()
        logging.basicConfig(level=logging.INFO,
                            format=f"[rank {env['RANK']}] %(levelname)s %(name)s: %(message)s")
        log.info("omnimask %s", shlex.join(self.argv))
        rc = self.main(self.argv)
        if stopsignals.received() == "SIGUSR2" and env["RANK"] == "0":
            # the trainer saved and stopped; submitit's own handler (back in place) now
            # checkpoints this callable and requeues the job, then exits
            signal.raise_signal(signal.SIGUSR2)
        if rc not in (0, INTERRUPTED):
            raise OmnimaskError(f"omnimask {shlex.join(self.argv)} exited with status {rc}")
        return rc

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(CommandJob(self.main, self.argv))


@dataclass
class SubmitOptions:
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    partition: str | None = None
    time_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 90
    max_requeues: int = 10
    name: str = "omnimask"
    executor: str = "slurm"  # slurm | local | debug
    extra: dict = field(default_factory=dict)  # more sbatch options


def load_sweep(path: str | os.PathLike) -> list[list[str]]:
    """A job array's override sets: a YAML list, each item a mapping of dotted keys to
    values (or a list of ``key=value`` strings)."""
    p = Path(path)
    try:
        items = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--array {p}: {e}") from None
    if not isinstance(items, list) or not items:
        raise ConfigError(f"--array {p}: expected a non-empty YAML list of override sets")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            out.append([f"{k}={_yaml_value(v)}" for k, v in item.items()])
        elif isinstance(item, list) and all(isinstance(t, str) and "=" in t for t in item):
            out.append(list(item))
        else:
            raise ConfigError(f"--array {p}: item {i} must be a mapping of key: value or a "
                              "list of key=value strings")
    return out


def _yaml_value(v) -> str:
    if isinstance(v, str):
        return v
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def executor(folder: Path, o: SubmitOptions):
    import submitit

    cluster = {"slurm": None, "local": "local", "debug": "debug"}[o.executor]
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster,
                               slurm_max_num_timeout=o.max_requeues)
    params = {"name": o.name, "nodes": o.nodes, "tasks_per_node": o.tasks_per_node,
              "cpus_per_task": o.cpus_per_task, "timeout_min": o.time_min}
    if o.gpus_per_node:
        params["gpus_per_node"] = o.gpus_per_node
    if o.mem_gb:
        params["mem_gb"] = o.mem_gb
    if o.executor == "slurm":
        extra = {k: v for k, v in (("account", o.account), ("qos", o.qos),
                                   ("constraint", o.constraint)) if v} | o.extra
        params |= {"slurm_signal_delay_s": o.signal_delay_s,
                   "slurm_additional_parameters": {"requeue": True, **extra}}
        if o.partition:
            params["slurm_partition"] = o.partition
    ex.update_parameters(**params)
    return ex
