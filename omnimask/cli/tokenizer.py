"""``omnimask tokenizer train|eval``: the per-modality tokenizers."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import OmnimaskError
from .common import QUIET, _check_out_dir, _write_json


def cmd_tokenizer_train(a: argparse.Namespace) -> int:
    from ..registry import TOKENIZERS
    from ..train.distributed import is_main

    overrides = list(a.overrides) + ([f"kind={a.codebook}"] if a.codebook else [])
    if a.codebook and a.modality != "speech":
        raise OmnimaskError("--quantizer (bestrq|kmeans) applies to speech tokenizers only")
    _check_out_dir(a.out, "--out")
    res = TOKENIZERS.get(a.modality).train(a.data, a.out, overrides, progress=not a.quiet)
    if is_main():  # one report for all ranks (parallel=ddp under torchrun)
        print(", ".join(f"{k}: {v}" for k, v in res.items()))
    return 0


def cmd_tokenizer_eval(a: argparse.Namespace) -> int:
    from ..registry import TOKENIZERS

    kwargs = {}
    if a.modality == "image":  # the reconstruction grid goes beside the JSON
        kwargs["grid"] = str(Path(a.out).with_suffix("")) + "_recon.png" if a.out else None
        kwargs["judge"] = a.judge
    elif a.judge:
        raise OmnimaskError("--judge scores images: it applies to image tokenizers only")
    res = TOKENIZERS.get(a.modality).evaluate(a.tokenizer, a.data, progress=not a.quiet, **kwargs)
    res = {"task": f"tokenizer-{a.modality}", "tokenizer": a.tokenizer, "data": a.data, "metrics": res}
    _write_json(res, a.out)
    if a.out:
        print(", ".join(f"{k}: {v}" for k, v in res["metrics"].items()))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    tk = sub.add_parser("tokenizer", help="train and evaluate the per-modality tokenizers")
    tsub = tk.add_subparsers(dest="tokenizer_command", required=True, metavar="SUBCOMMAND")
    tt = tsub.add_parser("train", parents=[QUIET], help="train a tokenizer on shards",
                         description="Train a tokenizer; key=value overrides set its config "
                                     "(text: vocab_size, min_frequency, num_sentinels, "
                                     "from_file=tokenizer.json to reuse an existing one; speech: "
                                     "codebook_size, stack, seed, iterations, max_frames; image "
                                     "(by default 16x16 FSQ 8-5-5-5 codes, object-weighted, "
                                     "on 32 px crops, 3000 steps): "
                                     "max_minutes, max_steps, batch_size, lr, vq.codebook_size, "
                                     "vq.channels, vq.ema, vq.downsample, "
                                     "vq.quantizer=vq|fsq|rq, vq.rq_depth, vq.fsq_levels, "
                                     "object_weight, edge_weight, crop, precision=fp32|bf16|auto, "
                                     "...). Image training resumes from "
                                     "OUT/checkpoints when present.")
    tt.add_argument("modality", choices=["text", "image", "speech"], help="which modality")
    # --kind: the flag's former name, still accepted
    tt.add_argument("--quantizer", "--kind", dest="codebook", choices=["bestrq", "kmeans"],
                    help="speech units: a frozen BEST-RQ projection or k-means (the config's "
                         "kind)")
    tt.add_argument("--data", nargs="+", required=True, help="training shards")
    tt.add_argument("--out", required=True, help="output directory")
    tt.add_argument("overrides", nargs="*", help="key=value config overrides")
    tt.set_defaults(fn=cmd_tokenizer_train)
    te = tsub.add_parser("eval", parents=[QUIET], help="evaluate a tokenizer on held-out shards")
    te.add_argument("modality", choices=["text", "image", "speech"], help="which modality")
    te.add_argument("--tokenizer", required=True, help="directory written by tokenizer train")
    te.add_argument("--data", nargs="+", required=True, help="held-out shards")
    te.add_argument("--out", help="write the metrics JSON here (default: print it)")
    te.add_argument("--judge", help="image, ShapesWorld shards: score the reconstructions with "
                                    "the shape judge in this file (trained and saved there "
                                    "when missing; 'shipped': the package's)")
    te.set_defaults(fn=cmd_tokenizer_eval)
