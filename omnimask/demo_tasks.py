"""The demo's task stage: the pretrained encoder exported, then a chain of fine-tuning runs
(``RUNS``: the retrieval and caption heads together, the VQA head alone, the retrieval and
caption heads again, the segmentation head; ``finetune multitask``, ``vqa`` and
``segment``, the packaged ``finetune/shapes_tasks`` config on the demo's data, sized in
steps), each task evaluated on test and test-novel, and the report section: the metrics
beside their baselines and the demo-tier targets, and the example PNGs."""

from __future__ import annotations

import re
from pathlib import Path

TASKS = ("vqa", "retrieval", "caption", "segment", "refer")  # evaluated
TRAINED = ("vqa", "retrieval", "caption", "segment")  # fine-tuning tasks (``mix`` keys)
EVAL_SPLITS = ("test", "test-novel")
# the demo's fine-tuning runs, in order: (run, ``finetune`` task, the tasks its model
# serves, its settings over configs/finetune/shapes_tasks, the runs whose model it starts
# from: the first of them that ran, else the pretrained one). VQA trains alone (in a mix
# with the others it learned less) from the retrieval + caption model: captioning teaches
# the trunk to bind colours to shapes, which VQA alone learns slowly; its softmax head
# learns best at half the rate (docs/experiments/2026-11-30-demo-time-and-captions.md).
# VQA's hue-turned images in turn teach the trunk shape apart from colour, so the
# retrieval and caption heads are trained again from the VQA model ("final": the
# retrieval and caption models served) and the segmentation head continues the chain
# (docs/experiments/2026-12-01-novel-pairs.md).
RUNS = (("multitask", "multitask", ("retrieval", "caption"), (), ()),
        ("vqa", "vqa", ("vqa",), ("trainer.lr=5e-4",), ("multitask",)),
        ("final", "multitask", ("retrieval", "caption"), (), ("vqa", "multitask")),
        ("segment", "segment", ("segment", "refer"), (), ("final", "vqa", "multitask")))
# settings of a run whose tasks a later run serves (its model only a step of the chain):
# the first run, whose model VQA starts from, trains its captions without the word-pair
# expert: with it, one draw's VQA test-novel shape and the chain's segmentation fell below
# their targets (docs/experiments/2026-12-02-caption-binding-probes.md)
STEP_SETTINGS = {"multitask": ("tasks.caption.debias_prior=0",)}
# quick mode's interactive protocol: a few objects, a few clicks
QUICK_SETTINGS = {"segment": {"noc_objects": 4, "noc_max_clicks": 3}}

# (task, metric key, label, demo-tier target, baseline: a metric key, "r10_chance" or None)
TARGETS = [
    ("vqa", "accuracy", "VQA accuracy", 0.70, "prior_baseline"),
    ("vqa", "per_type.color", "VQA colour", 0.75, "prior_per_type.color"),
    ("vqa", "per_type.shape", "VQA shape", 0.75, "prior_per_type.shape"),
    ("vqa", "per_type.count", "VQA count", None, "prior_per_type.count"),
    ("vqa", "per_type.relation", "VQA relation", None, "prior_per_type.relation"),
    ("retrieval", "t2i_r1", "text->image R@1", None, "r1_chance"),
    ("retrieval", "t2i_r10", "text->image R@10", 0.90, "r10_chance"),
    ("retrieval", "i2t_r10", "image->text R@10", None, None),
    ("retrieval", "s2i_r10", "speech->image R@10", None, "r10_chance"),
    ("caption", "cider", "caption CIDEr-D", None, None),
    ("caption", "color_precision", "caption colour precision", None, "color_precision_chance"),
    ("caption", "shape_precision", "caption shape precision", None, "shape_precision_chance"),
    ("caption", "pair_precision", "caption pair precision", 0.40, "pair_precision_chance"),
    ("caption", "pair_recall", "caption pair recall", None, "pair_recall_chance"),
    ("segment", "miou", "semantic mIoU", 0.50, None),
    ("segment", "pq", "panoptic PQ", None, None),
    ("segment", "point_miou", "one-click mIoU", None, None),
    ("segment", "box_miou", "box-prompt mIoU", None, None),
    ("segment", "noc85", "clicks to IoU 0.85 (fewer is better)", None, None),
    ("refer", "miou", "referring mIoU", 0.40, None),
    ("refer", "ciou", "referring cIoU", None, None),
]


def cut_note(what: str, x: dict) -> list[str]:
    """The report's bold line when the time cap stopped a stage before its steps."""
    if x.get("steps", 0) >= x.get("max_steps", 0):
        return []
    return [f"**The time cap stopped {what} at step {x['steps']} of {x['max_steps']}: "
            "its numbers are below what this stage learns on a machine that finishes it.**",
            ""]


def target_cells(value: float, target: float | None) -> tuple[str, str]:
    """A report row's target cell (``>= target``) and its pass/short mark; blank without one."""
    if target is None:
        return "", ""
    return f">= {target:.2f}", "pass" if value >= target else "short"


def baseline(result: dict, key: str | None) -> float | None:
    """A metric's baseline in one evaluation: a metric it carries, or retrieval's chance
    recall (k / gallery size)."""
    from .train.finetune import flat

    if key is None:
        return None
    if key.endswith("_chance") and key[0] == "r" and key[1:].split("_")[0].isdigit():
        k = int(key[1:].split("_")[0])
        return min(1.0, k / max(result["n"], 1))
    return flat(result["metrics"]).get(key)


def stage_tasks(steps: dict[str, int], max_minutes: float, run: Path, quick: bool,
                progress: bool, itm: bool = True, vqa_init: str = "multitask",
                segment_init: str = "chain", run_settings: dict | None = None) -> dict:
    """``steps``: each of ``RUNS``' fine-tuning steps by name (0: the run is skipped);
    ``itm``: the retrieval head trains ITM and re-ranks by it (else ITC alone);
    ``vqa_init`` / ``segment_init``: the VQA / segmentation run starts from the model
    ``RUNS`` names ("multitask" / "chain") or from the pretrained one ("pretrained");
    ``run_settings``: more key=value settings by run name, applied last."""
    from .config import load_config, packaged_config
    from .train.corpus import share_cache
    from .train.evaluate_task import evaluate_model
    from .train.export import export_run
    from .train.finetune import FinetuneConfig, Finetuning

    pre = export_run(run / "pretrain", run / "pretrain" / "model")
    runs, models = {}, {}
    for i, (name, task, serves, settings, starts) in enumerate(RUNS):
        n = steps.get(name, 0)
        if not n:
            continue
        if any(steps.get(later[0]) and set(later[2]) & set(serves) for later in RUNS[i + 1:]):
            settings = (*settings, *STEP_SETTINGS.get(name, ()))
        if {"vqa": vqa_init, "segment": segment_init}.get(name) == "pretrained":
            starts = ()
        init = next((runs[s]["model"] for s in starts if s in runs), pre)
        out = run / ("finetune" if name == "multitask" else f"finetune-{name}")
        share_cache(run / "pretrain", out)  # the same shards and tokenizers: tokenised once
        over = [f"out={out}",
                f"task={task}", f"init={init}",
                f"data.train=[{run / 'data' / 'train-*.tar'}]",
                f"data.val=[{run / 'data' / 'val-*.tar'}]",
                f"trainer.max_steps={n}", f"trainer.max_minutes={max_minutes}",
                # validation (and the export) once, at the end
                "trainer.eval_every=0", "trainer.eval_first=false",
                f"trainer.checkpoint_every={max(1, n // 3)}",
                f"trainer.warmup_steps={max(1, min(50, n // 10))}",
                "data.val_limit=8" if quick else "data.val_limit=100",
                # validation only picks the checkpoint: METEOR's JVM is for the test splits
                "tasks.caption.meteor=false", *settings]
        if task == "multitask":
            over += [f"mix.{t}=0" for t in TRAINED if t not in serves]
        if "retrieval" in serves and not itm:
            over += ["heads.retrieval.itm_weight=0", "heads.retrieval.rerank_k=0"]
        if quick:
            over += ["trainer.batch_size=4", "tasks.caption.eval_images=8"]
        over += list((run_settings or {}).get(name, ()))
        cfg = load_config(FinetuneConfig, packaged_config("finetune/shapes_tasks"), over)
        s = Finetuning(cfg, progress=progress).fit()
        runs[name] = {"tasks": list(serves), "steps": s["step"], "max_steps": n,
                      "status": s["status"], "train_seconds": s["train_seconds"],
                      "best": s.get("best", {}), "model": s["model"], "init": str(init)}
        models |= {t: s["model"] for t in serves}
    evals: dict = {}
    corpora: dict = {}  # each split tokenised once for every model with the same tokenizers
    for task in (t for t in TASKS if t in models):
        evals[task] = {}
        for split in EVAL_SPLITS:
            # exact names: "test-*.tar" would also match the test-novel shards
            shards = sorted(p for p in (run / "data").glob(f"{split}-*.tar")
                            if re.fullmatch(rf"{re.escape(split)}-\d+\.tar", p.name))
            ex = run / "examples" if split == "test" else None
            evals[task][split] = evaluate_model(task, models[task], [str(p) for p in shards],
                                                split=split, limit=16 if quick else None,
                                                examples=str(ex) if ex else None,
                                                progress=progress,
                                                settings=QUICK_SETTINGS.get(task) if quick
                                                else None, corpora=corpora)
    pngs = sorted(str(p.relative_to(run)) for p in (run / "examples").glob("*.png"))
    # report.json's models: one per fine-tuned head (refer is the segment model's task)
    heads = {t: m for t, m in models.items() if t in TRAINED}
    return {"runs": runs, "models": heads, "pretrained_model": str(pre), "eval": evals,
            "examples": pngs, "train_seconds": round(sum(r["train_seconds"]
                                                         for r in runs.values()), 1)}


def results_rows(x: dict) -> list[dict]:
    """One row per (metric, split): value, baseline, target and whether it holds."""
    from .train.finetune import flat

    rows = []
    for task, key, label, target, base in TARGETS:
        for split in EVAL_SPLITS:
            r = x["eval"].get(task, {}).get(split)
            v = flat(r["metrics"]).get(key) if r else None
            if v is None:
                continue
            b = baseline(r, base)
            rows.append({"task": task, "metric": key, "label": label, "split": split,
                         "value": v, "baseline": b, "target": target,
                         "pass": None if target is None else v >= target})
    return rows


def _runs_label(x: dict) -> str:
    return "; ".join(f"{' + '.join(r['tasks'])} {r['steps']} of {r['max_steps']} steps"
                     for r in x["runs"].values())


def report_lines(x: dict) -> list[str]:
    """The report's task section (markdown)."""
    notes = [ln for name, r in x["runs"].items() for ln in cut_note(f"{name} fine-tuning", r)]
    lines = ["", f"## Tasks (fine-tuning: {_runs_label(x)}; {x['train_seconds']:.0f} s)", "",
             *notes,
             "The pretrained model fine-tuned in a chain: the retrieval and caption heads "
             "together on one encoder, the VQA head from that model, the retrieval and "
             "caption heads again from the VQA model (the ones evaluated), and the "
             "segmentation head from that last model (semantic masks, referring "
             "expressions, clicks and boxes); each task evaluated on the test "
             "split and on test-novel (colour-shape pairs never seen in training). Baseline: "
             "VQA the most frequent answer per question type, retrieval chance, captions "
             "matched against another image's objects. Targets: the demo tier.", "",
             "| metric | split | value | baseline | target | |", "|---|---|---|---|---|---|"]
    for r in results_rows(x):
        b = "" if r["baseline"] is None else f"{r['baseline']:.3f}"
        t, mark = target_cells(r["value"], r["target"])
        lines.append(f"| {r['label']} | {r['split']} | {r['value']:.3f} | {b} | {t} | {mark} |")
    for p in x.get("examples", []):
        lines += ["", f"![{p}]({p})"]
    return lines


def summary_line(x: dict) -> str:
    parts = [f"{r['label']} {r['value']:.3f} (target {r['target']:.2f})"
             for r in results_rows(x) if r["split"] == "test" and r["target"] is not None]
    return f"tasks ({_runs_label(x)}) on test: " + ", ".join(parts)
