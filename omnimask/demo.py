"""``omnimask demo``: the main job on ShapesWorld, stage by stage, with a report.

Stages so far: generate the data (all splits, with speech), inspect every shard, measure
the dataset (objects, questions, answer priors, speech), read it through the resumable
pipeline (throughput, and a mid-epoch resume that must continue with the same samples),
draw a contact sheet, train and evaluate the tokenizers (text BPE, k-means speech units,
image codes (residual levels) with a reconstruction grid), pretrain
(``pretrain/shapes_tiny``; with id stacks MaskGIT joins the mix and draws), and
fine-tune and evaluate the task heads (``demo_tasks.py``). Training stages are sized in
steps; ``stage_max_minutes`` only stops a stuck machine, and the report says so.
Writes ``config.yaml``, ``report.json``, ``report.md``, ``report.html`` and PNGs.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections import Counter
from pathlib import Path

from .config import DataConfig, DemoConfig, save_config
from .demo_tasks import cut_note, stage_tasks, target_cells
from .demo_zoo import stage_zoo


def _split_sizes(cfg: DemoConfig, quick: bool) -> dict[str, int]:
    from .train.data.shapesworld.prepare import split_sizes

    return split_sizes(cfg.num_train, cfg.num_val, cfg.num_test, cfg.num_test_novel, quick)


def _stage_data(cfg: DemoConfig, run: Path, sizes: dict[str, int], progress: bool) -> dict:
    from .train.data.shapesworld.prepare import generate_splits

    return generate_splits(run / "data", sizes, seed=cfg.seed, image_size=cfg.image_size,
                           shard_size=cfg.shard_size, workers=cfg.workers, progress=progress,
                           train_question_rounds=cfg.train_question_rounds)


def _stage_inspect(run: Path, progress) -> dict:
    from .train.data.inspect import inspect_shards

    rep = inspect_shards([str(run / "data" / "*.tar")], workers=os.cpu_count() or 1,
                         progress=progress)
    return {k: rep[k] for k in ("shards", "samples", "bad", "lost", "keys", "splits",
                                "schema_version")} | {"problems": len(rep["problems"])}


def _stage_stats(run: Path) -> dict:
    from .train.data.pipeline import ShardLoader
    from .train.data.shapesworld.vocab import QA_TYPES

    stats = {}
    for split in ("train", "test-novel"):
        cfg = DataConfig(shards=[str(run / "data" / f"{split}-*.tar")], batch_size=64,
                         processors=["text", "qa", "meta", "speech"], shuffle_buffer=0)
        objects, qtypes, novel_imgs, n = Counter(), Counter(), 0, 0
        answers: dict[str, Counter] = {t: Counter() for t in QA_TYPES}
        seconds = []
        for b in ShardLoader(cfg, rank=0, world_size=1):
            for meta, qa, wav in zip(b["meta"], b["qa"], b["speech"]):
                n += 1
                objects[len(meta["objects"])] += 1
                novel_imgs += any(o["novel"] for o in meta["objects"])
                seconds.append(len(wav) / 16000)
                for q in qa:
                    qtypes[q["type"]] += 1
                    answers[q["type"]][q["answer"]] += 1
        total_q = sum(qtypes.values())
        prior = sum(c.most_common(1)[0][1] for c in answers.values() if c) / max(total_q, 1)
        stats[split] = {
            "images": n, "objects_per_image": dict(sorted(objects.items())),
            "questions": total_q, "questions_by_type": dict(qtypes),
            "prior_baseline": round(prior, 4),  # most frequent answer per question type
            "images_with_novel_pair": novel_imgs,
            "speech_seconds_mean": round(sum(seconds) / max(len(seconds), 1), 2)}
    return stats


def _stage_pipeline(cfg: DemoConfig, run: Path) -> dict:
    from .train.data.pipeline import ShardLoader

    dcfg = DataConfig(shards=[str(run / "data" / "train-*.tar")], batch_size=32,
                      num_workers=min(2, os.cpu_count() or 1), shuffle_buffer=500,
                      processors=["image", "masks", "text", "qa"], seed=cfg.seed)
    t0 = time.perf_counter()
    unbroken = ShardLoader(dcfg, 0, 1)
    full = [k for b in unbroken for k in b["__key__"]]
    rate = len(full) / (time.perf_counter() - t0)
    first = ShardLoader(dcfg, 0, 1)
    head: list[str] = []
    for b in first:
        head += b["__key__"]
        if len(head) >= len(full) // 2:
            break
    state = first.state_dict()
    second = ShardLoader(dcfg, 0, 1)
    second.load_state_dict(state)
    tail = [k for b in second for k in b["__key__"]]
    return {"samples": len(full), "samples_per_s": round(rate, 1), "workers": dcfg.num_workers,
            "resumed_after": len(head), "resume_exact": head + tail == full,
            "bad": unbroken.stats()["bad"]}


def _stage_tokenizers(cfg: DemoConfig, run: Path, quick: bool, progress: bool) -> dict:
    from .train.data.shapesworld.prepare import train_tokenizers

    return train_tokenizers(run / "data", run / "tokenizers", speech_units=cfg.speech_units,
                            vq_codes=cfg.vq_codes,
                            vq_steps=max(1, cfg.vq_steps // (10 if quick else 1)),
                            vq_max_minutes=cfg.stage_max_minutes,
                            grid=run / "vq_reconstructions.png", progress=progress,
                            vq_precision=cfg.precision, vq_crop=cfg.vq_crop,
                            vq_depth=cfg.vq_depth)


def _stage_pretrain(cfg: DemoConfig, run: Path, quick: bool, progress: bool) -> dict:
    """The packaged ``pretrain/shapes_tiny`` config on the demo's data and tokenizers, for
    ``pretrain_steps`` (its schedule scaled to them), after ``encoder_warmup_steps`` of the
    encoder's warm-up (then frozen)."""
    from .config import load_config, packaged_config
    from .train.pretrain import PretrainConfig, Pretraining

    tiny = packaged_config("pretrain/shapes_tiny")
    tok = run / "tokenizers"
    over = [f"out={run / 'pretrain'}", "prepare=false",
            f"data.train=[{run / 'data' / 'train-*.tar'}]",
            f"data.val=[{run / 'data' / 'val-*.tar'}]",
            f"tokenizers.text={tok / 'text'}", f"tokenizers.image={tok / 'image'}",
            f"tokenizers.speech={tok / 'speech'}",
            f"generate.shape_judge={'' if quick else 'shipped'}",
            f"encoder_warmup.precision={cfg.precision}"]
    base = load_config(PretrainConfig, tiny)
    if quick:
        over += ["trainer.max_steps=10", "trainer.batch_size=8", "trainer.eval_every=0",
                 "trainer.warmup_steps=2", "data.val_batch_size=8", "generate.captions=2",
                 "generate.images=2", "model.trunk.dim=32", "model.trunk.ffn_dim=64"]
    else:
        steps = cfg.pretrain_steps
        over += [f"trainer.max_minutes={cfg.stage_max_minutes}", f"trainer.max_steps={steps}",
                 f"trainer.eval_every={max(10, steps // 4)}",
                 f"trainer.warmup_steps={max(2, base.trainer.warmup_steps * steps // base.trainer.max_steps)}",
                 f"objectives.mix_ramp_steps={base.objectives.mix_ramp_steps * steps // base.trainer.max_steps}"]
    if cfg.vq_depth > 1:  # id stacks: MaskGIT draws them (generate.sampler auto), CM3 captions
        over += ["objectives.mix.maskgit=2"]
    warm = min(5, cfg.encoder_warmup_steps) if quick else cfg.encoder_warmup_steps
    if warm:  # the encoder learns what to see first, then keeps it (train/encoder_warmup.py)
        over += [f"encoder_warmup.steps={warm}", "model.image_encoder.frozen=true"]
    pcfg = load_config(PretrainConfig, tiny, over)
    s = Pretraining(pcfg, progress=progress).fit()
    samples = s.get("samples", {})
    return {"steps": s["step"], "max_steps": pcfg.trainer.max_steps,
            "train_seconds": s["elapsed_s"], "status": s["status"],
            "encoder_warmup": s.get("encoder_warmup"),
            "val": s["val"], "checkpoint": s["checkpoint"],
            "captions": samples.get("captions", [])[:4],
            **{k: samples.get(k) for k in (
                "captions_scored",
                "captions_naming_every_object", "chance_captions_naming_every_object",
                "caption_object_precision", "chance_caption_object_precision",
                "caption_colour_precision", "chance_caption_colour_precision",
                "caption_shape_precision", "chance_caption_shape_precision")},
            **{k: v for k, v in samples.items() if k.startswith(("images_", "reconstructions_"))
               and k != "images_png"},
            "generated_images": samples.get("images_png")}


def _stage_preview(run: Path) -> dict:
    from .train.data.pipeline import ShardLoader
    from .train.data.preview import contact_sheet

    pngs = {}
    for split, n in (("train", 12), ("test-novel", 6)):
        cfg = DataConfig(shards=[str(run / "data" / f"{split}-*.tar")], batch_size=n,
                         processors=["image", "masks", "text"], shuffle_buffer=0)
        b = next(iter(ShardLoader(cfg, rank=0, world_size=1)))
        samples = [{"image": b["image"][i].permute(1, 2, 0).numpy(), "seg": b["seg"][i].numpy(),
                    "inst": b["inst"][i].numpy(), "caption": b["captions"][i][0]}
                   for i in range(len(b["__key__"]))]
        pngs[split] = str(contact_sheet(samples, run / f"samples_{split}.png",
                                           title=f"{split} samples").name)
    return pngs


RATIO_TARGET = 0.70  # each objective's final / step-0 validation loss, shapes_tiny's bound
DRAWN_SHAPE_TARGET = 0.35  # the shape judge on images drawn from captions, demo tier


def generation_lines(x: dict) -> list[str]:
    """The report's table of what pretraining generates: CM3 captions scored against the
    images' objects, and images drawn from captions scored by the shape judge, each beside
    chance (and a target where one is set)."""
    rows = []
    if x.get("captions_scored"):
        n = x["captions_scored"]
        if x.get("caption_colour_precision") is None:
            return ["", f"CM3 captions of {n} val images: no object scores (not ShapesWorld "
                        "captions)."]
        for k, label in (("colour", "right colour"), ("shape", "right shape"),
                         ("object", "right (colour, shape)")):
            rows.append((f"CM3 captions of {n} val images: of the objects named, {label}",
                         x[f"caption_{k}_precision"], x[f"chance_caption_{k}_precision"], None))
        rows.append((f"CM3 captions naming every object (of {n})",
                     x["captions_naming_every_object"], x["chance_captions_naming_every_object"],
                     None))
    if x.get("images_judged"):
        n = x["images_judged"]
        rows.append((f"images drawn from {n} val captions: named colours present",
                     x["images_colour_present"], None, None))
        rows.append(("... of the objects in named colours, the named shape (judge)",
                     x["images_shape_hit"], x["images_shape_chance"], DRAWN_SHAPE_TARGET))
        rows.append(("VQ reconstructions of the same images: the named shape (judge)",
                     x["reconstructions_shape_hit"], x["reconstructions_shape_chance"], None))
    if not rows:
        return []
    out = ["", "| generated | value | chance | target | |", "|---|---|---|---|---|"]
    for label, v, chance, target in rows:
        fmt = (lambda y: f"{y:.3f}") if isinstance(v, float) else str
        c = "" if chance is None else fmt(chance)
        t, mark = target_cells(v, target)
        out.append(f"| {label} | {fmt(v)} | {c} | {t} | {mark} |")
    return out


def _write_reports(run: Path, report: dict) -> None:
    (run / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# omnimask demo", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['seconds']:.1f} |" for k, v in report["stages"].items()]
    m = report["metrics"]
    if "data" in m:
        lines += ["", "## Data", "", "| split | samples | shards | MB | generated/s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['samples']} | {v['shards']} | {v['mbytes']} | {v['samples_per_s']} |"
                  for k, v in m["data"].items()]
    if "inspect" in m:
        i = m["inspect"]
        lines += ["", f"Inspect: {i['samples']} samples in {i['shards']} shards, "
                      f"{i['bad']} bad, {i['lost']} lost, schema v{i['schema_version']}."]
    if "stats" in m:
        lines += ["", "## Dataset", "", "| split | images | questions | prior baseline | "
                  "novel-pair images | speech s |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['images']} | {v['questions']} | {v['prior_baseline']:.3f} | "
                  f"{v['images_with_novel_pair']} | {v['speech_seconds_mean']} |"
                  for k, v in m["stats"].items()]
    if "pipeline" in m:
        p = m["pipeline"]
        lines += ["", f"Pipeline: {p['samples']} samples at {p['samples_per_s']:.0f}/s with "
                      f"{p['workers']} workers; resumed after {p['resumed_after']}: "
                      f"{'exact' if p['resume_exact'] else 'NOT exact'}."]
    for name in m.get("preview", {}).values():
        lines += ["", f"![{name}]({name})"]
    if "tokenizers" in m:
        t = m["tokenizers"]
        lines += ["", "## Tokenizers (trained on train, measured on val)", "",
                  "| tokenizer | size | metrics | seconds |", "|---|---|---|---|"]
        if "text" in t:
            x = t["text"]
            lines.append(f"| text BPE | {x['vocab_size']} | {x['tokens_per_caption']} tokens/caption, "
                         f"round trip {x['roundtrip_exact']:.0%}, unknown {x['unknown_rate']:.1%} | "
                         f"{x['train_and_eval_seconds']} |")
        if "speech" in t:
            x = t["speech"]
            lines.append(f"| speech k-means | {x['size']} | usage {x['usage']:.0%}, perplexity "
                         f"{x['perplexity']:.0f}, {x['units_per_second']} units/s | "
                         f"{x['train_and_eval_seconds']} |")
        if "image" in t:
            x = t["image"]
            conv = f", {x['precision']} convolutions" if x.get("precision") else ""
            depth = len(x.get("usage_per_level", [])) or 1
            kind = f"image RQ, {depth} levels of" if depth > 1 else "image VQ"
            lines.append(f"| {kind} | {x['size']} | PSNR {x['psnr_db']:.1f} dB, usage "
                         f"{x['usage']:.0%}, {x['tokens_per_image'] // depth} positions x "
                         f"{depth} codes/image{conv} | {x['train_and_eval_seconds']} |")
            lines += ["", *cut_note("the VQ", x)]
            lines += ["", "![vq_reconstructions.png](vq_reconstructions.png)"]
    if "pretrain" in m:
        from .train.evaluate import summary_table

        x = m["pretrain"]
        lines += ["", f"## Pretraining ({x['steps']} steps, {x['train_seconds']:.0f} s)", "",
                  *cut_note("pretraining", x),
                  "Validation loss of each objective at the end over its loss at step 0 "
                  f"(target: at most {RATIO_TARGET:.2f}):", "", summary_table(x, RATIO_TARGET)]
        lines += generation_lines(x)
        for c in x["captions"]:
            lines += ["", f"CM3 caption: \"{c['generated']}\" (reference: \"{c['reference']}\")"]
        if x.get("generated_images"):
            rel = Path(x["generated_images"]).relative_to(run)
            lines += ["", "Generated images (top: VQ reconstructions of val images; bottom: "
                          "drawn from their captions):", "", f"![{rel}]({rel})"]
    if "tasks" in m:
        from .demo_tasks import report_lines

        lines += report_lines(m["tasks"])
    if m.get("zoo", {}).get("eval"):
        from .demo_zoo import report_lines as zoo_lines

        lines += zoo_lines(m["zoo"], m.get("tasks"))
    from .report_html import render_html, training_curves

    runs = {k: Path(r["model"]).parent for k, r in m.get("tasks", {}).get("runs", {}).items()}
    if training_curves(run, run / "training_curves.png", runs) is not None:
        lines += ["", "## Training curves", "",
                  "![training_curves.png](training_curves.png)"]
    md = "\n".join(lines) + "\n"
    (run / "report.md").write_text(md)
    (run / "report.html").write_text(render_html(md, run))


def run_demo(cfg: DemoConfig, quick: bool = False, progress: bool = True) -> dict:
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run)
    sizes = _split_sizes(cfg, quick)
    report: dict = {"run_dir": str(run), "quick": quick, "stages": {}, "metrics": {},
                    "models": {}, "data": str(run / "data")}
    stages = [("data", lambda: _stage_data(cfg, run, sizes, progress)),
              ("inspect", lambda: _stage_inspect(run, progress)),
              ("stats", lambda: _stage_stats(run)),
              ("pipeline", lambda: _stage_pipeline(cfg, run)),
              ("preview", lambda: _stage_preview(run)),
              ("tokenizers", lambda: _stage_tokenizers(cfg, run, quick, progress)),
              ("pretrain", lambda: _stage_pretrain(cfg, run, quick, progress)),
              ("tasks", lambda: stage_tasks(
                  {"vqa": 10 if quick else cfg.finetune_vqa_steps,
                   "multitask": 10 if quick else cfg.finetune_steps,
                   "final": min(10, cfg.finetune_final_steps) if quick
                   else cfg.finetune_final_steps,
                   "segment": min(10, cfg.finetune_segment_steps) if quick
                   else cfg.finetune_segment_steps},
                  cfg.stage_max_minutes, run, quick, progress, itm=cfg.retrieval_itm,
                  vqa_init=cfg.vqa_init, segment_init=cfg.segment_init,
                  run_settings=cfg.run_settings)),
              ("zoo", lambda: stage_zoo(run, quick, progress))]
    for name, fn in stages:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            report["metrics"][name] = fn()
            status = "ok"
        except Exception as e:  # noqa: BLE001 - a failed stage is reported, later ones still run
            traceback.print_exc()
            status = f"failed: {type(e).__name__}: {e}"
        report["stages"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 2)}
        if name == "tokenizers" and status == "ok":
            report["models"].update({f"tokenizer_{k}": str(run / "tokenizers" / k)
                                     for k in report["metrics"]["tokenizers"]})
        if name == "pretrain" and status == "ok":
            report["models"]["pretrained"] = report["metrics"]["pretrain"]["checkpoint"]
        if name == "tasks" and status == "ok":  # each task's model
            t = report["metrics"]["tasks"]
            report["models"]["pretrained_model"] = t["pretrained_model"]
            report["models"].update(t["models"])
        if name == "zoo" and status == "ok":
            report["models"]["zoo"] = report["metrics"]["zoo"]["models"]
        _write_reports(run, report)
    _print_summary(report)
    return report


def _print_summary(report: dict) -> None:
    m = report["metrics"]
    print("\n== summary")
    print(f"{'stage':<12}{'status':<10}{'seconds':>8}")
    for k, v in report["stages"].items():
        print(f"{k:<12}{v['status'][:40]:<10}{v['seconds']:>8.1f}")
    if "data" in m:
        print("generated: " + ", ".join(f"{k} {v['samples']}" for k, v in m["data"].items()))
    if "inspect" in m:
        i = m["inspect"]
        print(f"inspect: {i['samples']} samples, {i['bad']} bad, {i['lost']} lost, "
              f"keys: {', '.join(f'{k}={v}' for k, v in i['keys'].items())}")
    if "stats" in m:
        t = m["stats"]["train"]
        print(f"train: {t['questions']} questions {t['questions_by_type']}, prior baseline "
              f"{t['prior_baseline']:.3f}, speech {t['speech_seconds_mean']} s/caption")
        print(f"test-novel: {m['stats']['test-novel']['images_with_novel_pair']} of "
              f"{m['stats']['test-novel']['images']} images hold a held-out colour-shape pair "
              f"(train: {t['images_with_novel_pair']})")
    if "pipeline" in m:
        p = m["pipeline"]
        print(f"pipeline: {p['samples_per_s']:.0f} samples/s ({p['workers']} workers), "
              f"resume exact: {p['resume_exact']}")
    t = m.get("tokenizers", {})
    if t:
        print(f"tokenizers on val: text {t['text']['tokens_per_caption']} tokens/caption "
              f"(round trip {t['text']['roundtrip_exact']:.0%}); speech k-means usage "
              f"{t['speech']['usage']:.0%}; image codes PSNR {t['image']['psnr_db']:.1f} dB, "
              f"usage {t['image']['usage']:.0%}")
    if "pretrain" in m:
        x = m["pretrain"]
        print(f"pretrain: {x['steps']} steps in {x['train_seconds']:.0f} s; val loss final/step 0: "
              + ", ".join(f"{k} {v['ratio']}" for k, v in x["val"].items()))
        from .train.evaluate import caption_scores, image_scores

        if x.get("captions_scored"):
            print(f"pretrain: {caption_scores(x)}")
        if x.get("images_judged"):
            print(f"pretrain: {image_scores(x)}")
    if "tasks" in m:
        from .demo_tasks import summary_line

        print(summary_line(m["tasks"]))
    if m.get("zoo", {}).get("eval"):
        from .demo_zoo import summary_line as zoo_line

        print(zoo_line(m["zoo"]))
    print(f"report: {report['run_dir']}/report.md")
