"""``omnimask data shapes|inspect|convert``: make, inspect and convert shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import IMAGE_FITS
from ..errors import OmnimaskError
from .common import QUIET, _write_json


def cmd_data_shapes(a: argparse.Namespace) -> int:
    from ..train.data.shapesworld import SPLITS, generate_shards

    splits = [s.strip() for s in a.split.split(",")] if a.split != "all" else list(SPLITS)
    for s in splits:
        if s not in SPLITS:
            raise OmnimaskError(f"--split: unknown split {s!r}; choose from {', '.join(SPLITS)}, all")
    for name, v, lo in (("--num", a.num, 1), ("--shard-size", a.shard_size, 1),
                        ("--image-size", a.image_size, 16),
                        ("--question-rounds", a.question_rounds, 1)):
        if v < lo:
            raise OmnimaskError(f"{name} must be >= {lo}, got {v}")
    for s in splits:
        e = generate_shards(a.out, a.num, seed=a.seed, split=s, image_size=a.image_size,
                            shard_size=a.shard_size, speech=not a.no_speech, workers=a.workers,
                            progress=not a.quiet, question_rounds=a.question_rounds)
        print(f"{s}: {e['num']} samples in {len(e['shards'])} shard(s) under {a.out} "
              f"(keys: {', '.join(e['keys'])})")
    return 0


def cmd_data_inspect(a: argparse.Namespace) -> int:
    from ..train.data.inspect import format_report, inspect_shards, strict_summary

    rep = inspect_shards(a.shards, workers=a.workers, progress=not a.quiet)
    print(format_report(rep))
    if a.json:
        _write_json(rep, a.json)
    failed = strict_summary(rep) if a.strict else None
    if failed:
        print(f"omnimask: data inspect --strict failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


def cmd_data_convert(a: argparse.Namespace) -> int:
    from ..registry import CONVERTERS
    from ..train.data.shards import MANIFEST, check_name

    check_name(a.split, "--split")  # a name, not a path: shards go into --out only
    for name, v in (("--shard-size", a.shard_size), ("--max-image-size", a.max_image_size)):
        if v is not None and v < 1:
            raise OmnimaskError(f"{name} must be >= 1, got {v}")
    if a.image_size is not None and a.image_size < 1:
        raise OmnimaskError(f"--image-size must be >= 1, got {a.image_size}")
    kwargs = {"images": a.images, "out": a.out, "split": a.split,
              "shard_size": a.shard_size, "max_image_size": a.max_image_size,
              "image_size": a.image_size, "fit": a.fit, "progress": not a.quiet}
    if a.source in ("coco", "folder"):
        kwargs["captions"] = a.captions
    if a.source == "coco":
        kwargs.update(questions=a.questions, answers=a.answers)
    if a.source == "imagefolder":
        kwargs["caption_template"] = a.caption_template
    e = CONVERTERS.create(a.source, **kwargs)
    listed = f" (listed with the reasons in {Path(a.out) / MANIFEST})" if e["skipped"] else ""
    print(f"{a.split}: {e['num']} samples in {len(e['shards'])} shard(s) under {a.out}; "
          f"{e['skipped']} input rows or images skipped{listed}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make, inspect and convert webdataset shards")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    sh = dsub.add_parser("shapes", parents=[QUIET], help="generate ShapesWorld shards (procedural, exact labels)",
                         description="Generate ShapesWorld samples into OUT/<split>-NNNNNN.tar "
                                     "and update OUT/manifest.json. Same seed, same bytes.")
    sh.add_argument("--out", required=True, help="output directory")
    sh.add_argument("--num", type=int, default=1000, help="samples per split (default 1000)")
    sh.add_argument("--seed", type=int, default=0)
    sh.add_argument("--split", default="train",
                    help="train, val, test, test-novel, a comma list, or all (default train)")
    sh.add_argument("--image-size", type=int, default=64)
    sh.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    sh.add_argument("--no-speech", action="store_true", help="skip the spoken caption")
    sh.add_argument("--question-rounds", type=int, default=1, metavar="N",
                    help="draw each scene's question programs N times (repeats dropped): "
                         "more questions per image (default 1)")
    sh.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    sh.set_defaults(fn=cmd_data_shapes)

    ins = dsub.add_parser("inspect", parents=[QUIET], help="decode every sample; count keys and bad samples",
                          description="Read every sample, decode every member, compare with "
                                      "the manifest (counts, SHA-256); list bad samples.")
    ins.add_argument("shards", nargs="+", help="shard paths, globs, {000..009} patterns or dirs")
    ins.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    ins.add_argument("--workers", type=int, default=1)
    ins.add_argument("--strict", action="store_true", help="exit 1 if anything is bad")
    ins.set_defaults(fn=cmd_data_inspect)

    conv = dsub.add_parser("convert", help="convert real datasets to shards")
    csub = conv.add_subparsers(dest="source", required=True, metavar="SOURCE")
    coco = csub.add_parser("coco", parents=[QUIET], help="COCO captions JSON (+ VQA v2 questions/annotations)")
    coco.add_argument("--images", required=True, help="folder with the images")
    coco.add_argument("--captions", required=True, help="captions_*.json")
    coco.add_argument("--questions", help="v2_OpenEnded_mscoco_*_questions.json")
    coco.add_argument("--answers", help="v2_mscoco_*_annotations.json")
    folder = csub.add_parser("folder", parents=[QUIET], help="image folder + captions .csv/.tsv/.jsonl")
    folder.add_argument("--images", required=True, help="folder with the images")
    folder.add_argument("--captions", required=True,
                        help="CSV/TSV with columns image,caption or JSONL {image, caption(s)}")
    images = csub.add_parser("images", parents=[QUIET],
                             help="every image under a folder, no text (for image tokenizers)")
    images.add_argument("--images", required=True, help="folder with the images (recursive)")
    imf = csub.add_parser("imagefolder", parents=[QUIET],
                          help="ImageFolder layout ROOT/<class>/<image>: class labels")
    imf.add_argument("--images", required=True, help="ROOT, with one folder per class")
    imf.add_argument("--caption-template", default="a photo of a {}.",
                     help="caption.txt from the class name; '' writes none "
                          "(default: 'a photo of a {}.')")
    for c in (coco, folder, images, imf):
        c.add_argument("--out", required=True, help="output directory")
        c.add_argument("--split", default="train")
        c.add_argument("--shard-size", type=int, default=1000)
        c.add_argument("--max-image-size", type=int, default=None,
                       help="downscale so the longer side is at most this")
        c.add_argument("--image-size", type=int, default=None,
                       help="store every image as a SIZE x SIZE square, fitted by --fit "
                            "(default: keep the size)")
        c.add_argument("--fit", choices=IMAGE_FITS, default="crop",
                       help="with --image-size: centre crop, pad (black borders) or stretch "
                            "(default crop)")
        c.set_defaults(fn=cmd_data_convert)
