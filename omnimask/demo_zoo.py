"""The demo's zoo stage: the shipped models (``omnimask zoo list``), fetched through the
verified download path into the run's own cache, evaluated on the demo's test split beside
the models the demo just trained; the report's table of both tiers."""

from __future__ import annotations

import re
from pathlib import Path

from .demo_tasks import QUICK_SETTINGS, TARGETS, TASKS

# retrieval ranked by ITC alone, as the demo's own model ranks: ITM re-ranking barely moved
# the zoo model's recall on the demo's test split, at several times the cost
ZOO_SETTINGS = {"retrieval": {"rerank_k": 0}}


def stage_zoo(run: Path, quick: bool, progress: bool) -> dict:
    from .train.evaluate_task import evaluate_model
    from .zoo import builtin_manifest
    from .zoo.fetch import fetch_entry
    from .zoo.manifest import read_manifest_file

    shipped = read_manifest_file(builtin_manifest()) if builtin_manifest().is_file() else []
    cache = run / "zoo"  # the demo writes nothing outside its run directory
    shards = [str(p) for p in sorted((run / "data").glob("test-*.tar"))
              if re.fullmatch(r"test-\d+\.tar", p.name)]
    models, evals, corpora = {}, {}, {}
    for e in shipped:
        d = fetch_entry(e, cache, progress)
        models[e.name] = str(d)
        for task in (t for t in TASKS if t in e.tasks and t not in evals):
            settings = dict(QUICK_SETTINGS.get(task, {})) if quick else {}
            settings |= ZOO_SETTINGS.get(task, {})
            r = evaluate_model(task, str(d), shards, split="test", limit=16 if quick else None,
                               progress=progress, settings=settings or None,
                               corpora=corpora)
            evals[task] = {"model": e.name, "result": r}
    return {"models": models, "eval": evals, "cache": str(cache),
            "recipes": {e.name: e.recipe for e in shipped}}


def report_lines(zoo: dict, tasks: dict | None) -> list[str]:
    """Markdown: each headline metric of the demo's models and of the zoo's, on test."""
    from .train.finetune import flat

    lines = ["", "## Zoo models beside the demo's", "",
             "The models shipped in the repository's zoo/ (trained by "
             "configs/recipes/shapes_tasks_small.yaml: more data and steps), downloaded into "
             f"{Path(zoo['cache']).name}/ with their SHA-256 checked, and evaluated on this "
             "run's test split (retrieval ranked by ITC alone).", "",
             "| metric | this demo | zoo model | target | zoo name |", "|---|---|---|---|---|"]
    for task, key, label, target, _ in TARGETS:
        z = zoo["eval"].get(task)
        if z is None:
            continue
        zv = flat(z["result"]["metrics"]).get(key)
        mine = ((tasks or {}).get("eval", {}).get(task, {}).get("test") or {}).get("metrics")
        dv = flat(mine).get(key) if mine else None
        if zv is None:
            continue
        d = "" if dv is None else f"{dv:.3f}"
        t = "" if target is None else f">= {target:.2f}"
        lines.append(f"| {label} | {d} | {zv:.3f} | {t} | {z['model']} |")
    return lines


def summary_line(zoo: dict) -> str:
    from .train.finetune import flat

    parts = []
    for task, key, label, target, _ in TARGETS:
        z = zoo["eval"].get(task)
        v = flat(z["result"]["metrics"]).get(key) if z else None
        if v is not None and target is not None:
            parts.append(f"{label} {v:.3f}")
    return "zoo models on test: " + ", ".join(parts)
