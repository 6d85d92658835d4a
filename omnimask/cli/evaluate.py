"""``omnimask eval TASK --model DIR|ZOO_NAME --data SHARDS``: a task model's metrics on shards
(``generate``: a pretrained model's images drawn from captions, judged)."""

from __future__ import annotations

import argparse

from .common import QUIET, _write_json

TASKS = ("vqa", "retrieval", "caption", "segment", "refer", "generate")


def settings(pairs: list[str] | None) -> dict:
    """``KEY=VALUE`` strings -> the task's settings (values parsed as YAML scalars)."""
    import yaml

    from ..errors import ConfigError

    out = {}
    for p in pairs or []:
        key, eq, value = p.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set takes KEY=VALUE, got {p!r}")
        out[key] = yaml.safe_load(value)
    return out


def cmd_eval(a: argparse.Namespace) -> int:
    from ..train.evaluate_task import evaluate_model, metrics_table

    result = evaluate_model(a.task, a.model, a.data, split=a.split, limit=a.limit,
                            examples=a.examples, progress=not a.quiet,
                            settings=settings(a.set), device=a.device)
    print(metrics_table(result))
    if a.out:
        _write_json(result, a.out)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", parents=[QUIET], help="evaluate a task model on shards",
                        description="Evaluate a model directory's task head on shards: "
                        "prints a table and writes {task, split, n, metrics, model, data, device} "
                        "as JSON with --out.")
    ev.add_argument("task", choices=TASKS, help="the task to evaluate; generate: images "
                    "drawn from the shards' captions by a CM3-pretrained model, scored by the "
                    "ShapesWorld shape judge (--set shape_judge=FILE, guidance, candidates, ...)")
    ev.add_argument("--model", required=True, help="a model directory with the task's head "
                                                   "(RUN/model of omnimask finetune), a zoo name or "
                                                   "hf://org/repo")
    ev.add_argument("--data", required=True, nargs="+", help="shard paths or globs")
    ev.add_argument("--split", help="name of the split the shards hold (reported; default: "
                                    "from the shard names)")
    ev.add_argument("--limit", type=int, help="evaluate only the first N images")
    ev.add_argument("--out", help="write the metrics JSON here")
    ev.add_argument("--examples", help="write qualitative PNGs into this folder")
    ev.add_argument("--device", default="auto", help="where the model runs: auto (a CUDA GPU "
                    "when there is one), cpu, cuda, cuda:N (default: auto)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="a task setting (tasks.<task> of a fine-tuning config), e.g. "
                         "--set noc_max_clicks=20; repeatable")
    ev.set_defaults(fn=cmd_eval)
