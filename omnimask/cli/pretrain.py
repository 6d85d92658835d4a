"""``omnimask pretrain``: multi-task pretraining of the trunk on shards."""

from __future__ import annotations

import argparse

from ..errors import Interrupted
from .common import EXIT_INTERRUPTED, QUIET, _check_out_dir, add_run_arguments


def cmd_pretrain(a: argparse.Namespace) -> int:
    from ..config import load_config, to_yaml
    from ..train.distributed import is_main
    from ..train.evaluate import caption_scores, image_scores, summary_table
    from ..train.pretrain import PretrainConfig, Pretraining

    values = {"out": a.out} if a.out else {}
    cfg = load_config(PretrainConfig, a.config, a.overrides, **values)
    if a.print_config:  # the resolved config; nothing is run or written
        print(to_yaml(cfg), end="")
        return 0
    _check_out_dir(cfg.out, "--out" if a.out else "out")
    summary = Pretraining(cfg, progress=not a.quiet).fit()
    if not is_main():  # rank 0 reports for all ranks
        return EXIT_INTERRUPTED if summary["status"].startswith("interrupted") else 0
    print(f"{summary['status']} at step {summary['step']} in {summary['elapsed_s']:.0f} s of "
          f"training; checkpoint {summary['checkpoint']}")
    if summary["status"].startswith("interrupted"):  # no samples were drawn: resume first
        raise Interrupted(f"pretraining {summary['status']} at step {summary['step']}; "
                          f"checkpoint saved in {summary['checkpoint']}")
    print(summary_table(summary))
    samples = summary.get("samples", {})
    for c in samples.get("captions", [])[:4]:
        print(f"  caption: {c['generated']!r}  (reference: {c['reference']!r})")
    if samples.get("captions"):
        print(caption_scores(samples))
    if samples.get("images_judged"):
        print(image_scores(samples))
    if "grounding" in samples:
        g = samples["grounding"]
        print("CM3 grounding (val loss, own vs another sample's): image tokens given caption "
              f"{g['image_given_caption']:.3f} vs {g['image_given_other_caption']:.3f}; caption "
              f"given image {g['caption_given_image']:.3f} vs {g['caption_given_other_image']:.3f}")
        if "maskgit" in g:
            m = g["maskgit"]
            obj = (f"; object codes {m['object_codes_given_caption']:.3f} vs "
                   f"{m['object_codes_given_other_caption']:.3f}"
                   if "object_codes_given_caption" in m else "")
            print("MaskGIT grounding (val loss, every code masked, own vs another sample's "
                  f"caption): codes {m['codes_given_caption']:.3f} vs "
                  f"{m['codes_given_other_caption']:.3f}{obj}")
    print(cfg.out)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    pt = sub.add_parser("pretrain", parents=[QUIET], help="pretrain the trunk (UNITER, CM3, "
                        "speech units) on shards", description="Multi-task pretraining; "
                        "prints the run directory last. Resumes from its newest complete "
                        "checkpoint (trainer.resume=auto). SIGTERM/SIGUSR2 stop it after "
                        f"a checkpoint, exit status {EXIT_INTERRUPTED}: run the same command "
                        "again to resume.")
    add_run_arguments(pt, "PretrainConfig", "shapes_tiny")
    pt.set_defaults(fn=cmd_pretrain)
