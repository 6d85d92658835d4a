"""The ``omnimask`` command. ``main(argv)`` is callable from tests.

Every subcommand exits non-zero with a one-line cause on bad input (``EXIT_*`` below);
``--debug`` or ``OMNIMASK_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import check_override
from .errors import Interrupted, OmnimaskError

EXIT_FAILED = 1  # data inspect --strict found problems, a demo stage failed, an unexpected error
EXIT_BAD_INPUT = 2  # a bad argument, config, file or directory: the message names it
EXIT_INTERRUPTED = 3  # SIGTERM/SIGUSR2: a checkpoint was saved, the same command resumes
EXIT_CTRL_C = 130
EPILOG = (f"exit status: 0 done; {EXIT_FAILED} failed (data inspect --strict found problems, "
          f"a demo stage failed, an unexpected error); {EXIT_BAD_INPUT} bad input (argument, "
          f"config key, file or directory: named in one line); {EXIT_INTERRUPTED} interrupted "
          f"by SIGTERM or SIGUSR2 after saving a checkpoint: run the same command again to "
          f"resume; {EXIT_CTRL_C} Ctrl-C. --debug (anywhere) or OMNIMASK_DEBUG=1: a traceback "
          "instead of the one-line error.")


def _check_out_dir(path: str | os.PathLike, what: str) -> None:
    """An output directory the command can create or write into, else an error naming it;
    nothing is created here (a later config error leaves no trace)."""
    p = Path(path)
    for d in (p, *p.parents):  # the nearest existing one decides
        if not d.exists():
            continue
        if not d.is_dir():
            raise OmnimaskError(f"{what} {p}: {d} is a file, not a directory")
        if not os.access(d, os.W_OK | os.X_OK):
            raise OmnimaskError(f"{what} {p}: {d} is not writable")
        return


def _at_least(*checks: tuple[str, int, int]) -> None:
    """(flag, value, lowest allowed) triples: an error naming the first flag below it."""
    for flag, v, lo in checks:
        if v < lo:
            raise OmnimaskError(f"{flag} must be >= {lo}, got {v}")


def _write_json(obj: dict, out: str | None) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        print(f"wrote {path}")
    else:
        sys.stdout.write(text)


# -- data ------------------------------------------------------------------------------------
def cmd_data_shapes(a: argparse.Namespace) -> int:
    from .train.data.shapesworld import SPLITS, generate_shards

    splits = [s.strip() for s in a.split.split(",")] if a.split != "all" else list(SPLITS)
    for s in splits:
        if s not in SPLITS:
            raise OmnimaskError(f"--split: unknown split {s!r}; choose from {', '.join(SPLITS)}, all")
    for name, v, lo in (("--num", a.num, 1), ("--shard-size", a.shard_size, 1),
                        ("--image-size", a.image_size, 16)):
        if v < lo:
            raise OmnimaskError(f"{name} must be >= {lo}, got {v}")
    for s in splits:
        e = generate_shards(a.out, a.num, seed=a.seed, split=s, image_size=a.image_size,
                            shard_size=a.shard_size, speech=not a.no_speech, workers=a.workers,
                            progress=not a.quiet)
        print(f"{s}: {e['num']} samples in {len(e['shards'])} shard(s) under {a.out} "
              f"(keys: {', '.join(e['keys'])})")
    return 0


def cmd_data_inspect(a: argparse.Namespace) -> int:
    from .train.data.inspect import format_report, inspect_shards, strict_summary

    rep = inspect_shards(a.shards, workers=a.workers, progress=not a.quiet)
    print(format_report(rep))
    if a.json:
        _write_json(rep, a.json)
    failed = strict_summary(rep) if a.strict else None
    if failed:
        print(f"omnimask: data inspect --strict failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


def cmd_data_convert(a: argparse.Namespace) -> int:
    from .registry import CONVERTERS
    from .train.data.shards import MANIFEST, check_name

    check_name(a.split, "--split")  # a name, not a path: shards go into --out only
    for name, v in (("--shard-size", a.shard_size), ("--max-image-size", a.max_image_size)):
        if v is not None and v < 1:
            raise OmnimaskError(f"{name} must be >= 1, got {v}")
    kwargs = {"images": a.images, "captions": a.captions, "out": a.out, "split": a.split,
              "shard_size": a.shard_size, "max_image_size": a.max_image_size,
              "progress": not a.quiet}
    if a.source == "coco":
        kwargs.update(questions=a.questions, answers=a.answers)
    e = CONVERTERS.create(a.source, **kwargs)
    listed = f" (listed with the reasons in {Path(a.out) / MANIFEST})" if e["skipped"] else ""
    print(f"{a.split}: {e['num']} samples in {len(e['shards'])} shard(s) under {a.out}; "
          f"{e['skipped']} input rows or images skipped{listed}")
    return 0


# -- tokenizer ------------------------------------------------------------------------------
def cmd_tokenizer_train(a: argparse.Namespace) -> int:
    from .registry import TOKENIZERS

    overrides = list(a.overrides) + ([f"kind={a.codebook}"] if a.codebook else [])
    if a.codebook and a.kind != "speech":
        raise OmnimaskError("--kind (bestrq|kmeans) applies to speech tokenizers only")
    _check_out_dir(a.out, "--out")
    res = TOKENIZERS.get(a.kind).train(a.data, a.out, overrides, progress=not a.quiet)
    print(", ".join(f"{k}: {v}" for k, v in res.items()))
    return 0


def cmd_tokenizer_eval(a: argparse.Namespace) -> int:
    from .registry import TOKENIZERS

    kwargs = {}
    if a.kind == "image":  # the reconstruction grid goes beside the JSON
        kwargs["grid"] = str(Path(a.out).with_suffix("")) + "_recon.png" if a.out else None
    res = TOKENIZERS.get(a.kind).evaluate(a.tokenizer, a.data, progress=not a.quiet, **kwargs)
    res = {"task": f"tokenizer-{a.kind}", "tokenizer": a.tokenizer, "data": a.data, "metrics": res}
    _write_json(res, a.out)
    if a.out:
        print(", ".join(f"{k}: {v}" for k, v in res["metrics"].items()))
    return 0


# -- bench -----------------------------------------------------------------------------------
def cmd_bench_tokenizer(a: argparse.Namespace) -> int:
    from .bench_tokenizer import bench_tokenizer

    _at_least(("--num", a.num, 1), ("--repeats", a.repeats, 1))
    res = bench_tokenizer(a.data or None, a.image_tokenizer, num=a.num, repeats=a.repeats,
                          progress=not a.quiet)
    print(f"image VQ encode: {res['image_vq_encode']['images_per_s']:.0f} images/s, decode: "
          f"{res['image_vq_decode']['images_per_s']:.0f} images/s; speech encode: BEST-RQ "
          f"{res['speech_bestrq_encode']['audio_seconds_per_s']:.0f}, k-means "
          f"{res['speech_kmeans_encode']['audio_seconds_per_s']:.0f} s of audio per s")
    _write_json(res, a.out)
    return 0


def cmd_bench_trunk(a: argparse.Namespace) -> int:
    from .bench_trunk import bench_trunk
    from .train.trainer import device_problem

    _at_least(*((f"--{k.replace('_', '-')}", getattr(a, k), 0 if k == "warmup" else 1)
                for k in ("layers", "dim", "heads", "ffn", "vocab", "batch", "min_len",
                          "max_len", "steps", "warmup")))
    if a.dim % a.heads:
        raise OmnimaskError(f"--dim {a.dim} is not divisible by --heads {a.heads}")
    if a.min_len > a.max_len:
        raise OmnimaskError(f"--min-len {a.min_len} is above --max-len {a.max_len}")
    if a.device and device_problem(a.device):
        raise OmnimaskError(f"--device {device_problem(a.device)}")
    res = bench_trunk(a.layers, a.dim, a.heads, a.ffn, a.vocab, a.batch, a.min_len, a.max_len,
                      a.steps, a.warmup, a.device)
    print(f"variable lengths [{a.min_len}, {a.max_len}]: omnimask "
          f"{res['omnimask']['tokens_per_s']:.0f} vs transformers {res['hf']['tokens_per_s']:.0f} "
          f"real tokens/s, ratio {res['ratio']:.2f}; full length: ratio "
          f"{res['full_length']['ratio']:.2f}")
    _write_json(res, a.out)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .train.data.bench import bench_data

    _at_least(("--num", a.num, 1), ("--batch-size", a.batch_size, 1),
              ("--repeats", a.repeats, 1), ("--workers", a.workers or 0, 0))
    res = bench_data(a.data or None, num=a.num, batch_size=a.batch_size, workers=a.workers,
                     repeats=a.repeats, vs=None if a.vs == "none" else a.vs,
                     progress=not a.quiet)
    o, s = res["omnimask"], res["speech"]
    print(f"image+text+masks: {o['one_core']['samples_per_s']:.0f} samples/s on one core; "
          + ", ".join(f"{k}: {v['samples_per_s']:.0f}/s ({v['per_worker_samples_per_s']:.0f}/s per worker)"
                      for k, v in o.items() if k != "one_core"))
    print(f"all labels (+qa, refs, meta): {res['all_labels']['one_core']['samples_per_s']:.0f} "
          f"samples/s on one core")
    print(f"speech path: {s['one_core']['samples_per_s']:.0f} samples/s on one core")
    if "ratio" in res:
        print(f"webdataset peer: {res['webdataset']['one_core']['samples_per_s']:.0f} samples/s "
              f"on one core; ratio omnimask/webdataset = {res['ratio']:.2f}")
    _write_json(res, a.out)
    return 0


# -- demo ------------------------------------------------------------------------------------
def cmd_demo(a: argparse.Namespace) -> int:
    from .config import DemoConfig, load_config
    from .demo import run_demo

    values = {"out": a.out} if a.out else {}
    cfg = load_config(DemoConfig, a.config, a.overrides, **values)
    _check_out_dir(cfg.out, "--out" if a.out else "out")
    report = run_demo(cfg, quick=a.quick, progress=not a.quiet)
    status = report["metrics"].get("pretrain", {}).get("status", "")
    if status.startswith("interrupted"):
        raise Interrupted(f"demo pretraining {status}; checkpoint saved in "
                          f"{report['metrics']['pretrain']['checkpoint']}")
    return 0 if all(s["status"] == "ok" for s in report["stages"].values()) else EXIT_FAILED


# -- pretrain --------------------------------------------------------------------------------
def cmd_pretrain(a: argparse.Namespace) -> int:
    from .config import load_config
    from .train.pretrain import (
        PretrainConfig,
        Pretraining,
        caption_scores,
        image_scores,
        summary_table,
    )

    values = {"out": a.out} if a.out else {}
    cfg = load_config(PretrainConfig, a.config, a.overrides, **values)
    _check_out_dir(cfg.out, "--out" if a.out else "out")
    summary = Pretraining(cfg, progress=not a.quiet).fit()
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
    print(cfg.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnimask",
                                description="omnimask: multimodal masked foundation models.",
                                epilog=EPILOG)
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (anywhere on the line; also "
                        "OMNIMASK_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    data = sub.add_parser("data", help="make, inspect and convert webdataset shards")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    sh = dsub.add_parser("shapes", parents=[quiet], help="generate ShapesWorld shards (procedural, exact labels)",
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
    sh.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    sh.set_defaults(fn=cmd_data_shapes)

    ins = dsub.add_parser("inspect", parents=[quiet], help="decode every sample; count keys and bad samples",
                          description="Read every sample, decode every member, compare with "
                                      "the manifest (counts, SHA-256); list bad samples.")
    ins.add_argument("shards", nargs="+", help="shard paths, globs, {000..009} patterns or dirs")
    ins.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    ins.add_argument("--workers", type=int, default=1)
    ins.add_argument("--strict", action="store_true", help="exit 1 if anything is bad")
    ins.set_defaults(fn=cmd_data_inspect)

    conv = dsub.add_parser("convert", help="convert real datasets to shards")
    csub = conv.add_subparsers(dest="source", required=True, metavar="SOURCE")
    coco = csub.add_parser("coco", parents=[quiet], help="COCO captions JSON (+ VQA v2 questions/annotations)")
    coco.add_argument("--images", required=True, help="folder with the images")
    coco.add_argument("--captions", required=True, help="captions_*.json")
    coco.add_argument("--questions", help="v2_OpenEnded_mscoco_*_questions.json")
    coco.add_argument("--answers", help="v2_mscoco_*_annotations.json")
    folder = csub.add_parser("folder", parents=[quiet], help="image folder + captions .csv/.tsv/.jsonl")
    folder.add_argument("--images", required=True, help="folder with the images")
    folder.add_argument("--captions", required=True,
                        help="CSV/TSV with columns image,caption or JSONL {image, caption(s)}")
    for c in (coco, folder):
        c.add_argument("--out", required=True, help="output directory")
        c.add_argument("--split", default="train")
        c.add_argument("--shard-size", type=int, default=1000)
        c.add_argument("--max-image-size", type=int, default=None,
                       help="downscale so the longer side is at most this")
        c.set_defaults(fn=cmd_data_convert)

    tk = sub.add_parser("tokenizer", help="train and evaluate the per-modality tokenizers")
    tsub = tk.add_subparsers(dest="tokenizer_command", required=True, metavar="SUBCOMMAND")
    tt = tsub.add_parser("train", parents=[quiet], help="train a tokenizer on shards",
                         description="Train a tokenizer; key=value overrides set its config "
                                     "(text: vocab_size, min_frequency, num_sentinels, "
                                     "from_file=tokenizer.json to reuse an existing one; speech: "
                                     "codebook_size, stack, seed, iterations, max_frames; image: "
                                     "max_minutes, max_steps, batch_size, lr, vq.codebook_size, "
                                     "vq.channels, vq.ema, ...). Image training resumes from "
                                     "OUT/checkpoints when present.")
    tt.add_argument("kind", choices=["text", "image", "speech"], help="which modality")
    tt.add_argument("--kind", dest="codebook", choices=["bestrq", "kmeans"],
                    help="speech codebook: frozen BEST-RQ projection or k-means units")
    tt.add_argument("--data", nargs="+", required=True, help="training shards")
    tt.add_argument("--out", required=True, help="output directory")
    tt.add_argument("overrides", nargs="*", help="key=value config overrides")
    tt.set_defaults(fn=cmd_tokenizer_train)
    te = tsub.add_parser("eval", parents=[quiet], help="evaluate a tokenizer on held-out shards")
    te.add_argument("kind", choices=["text", "image", "speech"], help="which modality")
    te.add_argument("--tokenizer", required=True, help="directory written by tokenizer train")
    te.add_argument("--data", nargs="+", required=True, help="held-out shards")
    te.add_argument("--out", help="write the metrics JSON here (default: print it)")
    te.set_defaults(fn=cmd_tokenizer_eval)

    bench = sub.add_parser("bench", help="benchmarks (results as JSON)")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    bd = bsub.add_parser("data", parents=[quiet], help="read+decode+process throughput vs plain webdataset",
                         description="Samples/s of the shard reader on one core and with "
                                     "worker processes; the speech path separately.")
    bd.add_argument("--data", nargs="*", help="shards (default: generate ShapesWorld)")
    bd.add_argument("--num", type=int, default=2000, help="samples to generate if no --data")
    bd.add_argument("--batch-size", type=int, default=64)
    bd.add_argument("--workers", type=int, default=None, help="worker processes (default 2)")
    bd.add_argument("--repeats", type=int, default=3)
    bd.add_argument("--vs", choices=["webdataset", "none"], default="webdataset")
    bd.add_argument("--out", help="write the result JSON here")
    bd.set_defaults(fn=cmd_bench)
    btr = bsub.add_parser("trunk", parents=[quiet], help="MLM training step vs transformers",
                          description="Tokens/s of an MLM training step (fwd, bwd, AdamW) of the "
                                      "trunk and of transformers' BertForMaskedLM (SDPA), same "
                                      "sizes and batches, alternating in one process.")
    btr.add_argument("--vs", choices=["hf"], default="hf", help="the peer (transformers BERT)")
    for flag, default in (("--layers", 4), ("--dim", 256), ("--heads", 4), ("--ffn", 1024),
                          ("--vocab", 8192), ("--batch", 16), ("--min-len", 32),
                          ("--max-len", 256), ("--steps", 10), ("--warmup", 2)):
        btr.add_argument(flag, type=int, default=default)
    btr.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    btr.add_argument("--out", help="write the result JSON here")
    btr.set_defaults(fn=cmd_bench_trunk)
    btk = bsub.add_parser("tokenizer", parents=[quiet], help="tokenizer encode throughput",
                          description="VQ encode/decode images/s and speech encode seconds of "
                                      "audio per second (BEST-RQ and k-means).")
    btk.add_argument("--data", nargs="*", help="shards with images and speech (default: "
                                               "generate ShapesWorld)")
    btk.add_argument("--image-tokenizer", help="a trained image tokenizer (default: untrained)")
    btk.add_argument("--num", type=int, default=200, help="samples to generate if no --data")
    btk.add_argument("--repeats", type=int, default=3)
    btk.add_argument("--out", help="write the result JSON here")
    btk.set_defaults(fn=cmd_bench_tokenizer)

    pt = sub.add_parser("pretrain", parents=[quiet], help="pretrain the trunk (UNITER, CM3, "
                        "speech units) on shards", description="Multi-task pretraining; "
                        "prints the run directory last. Resumes from its newest complete "
                        "checkpoint (trainer.resume=auto). SIGTERM/SIGUSR2 stop it after "
                        f"a checkpoint, exit status {EXIT_INTERRUPTED}: run the same command "
                        "again to resume.")
    pt.add_argument("--config", required=True, help="YAML with PretrainConfig keys")
    pt.add_argument("--out", help="run directory (overrides the config's out)")
    pt.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=50")
    pt.set_defaults(fn=cmd_pretrain)

    demo = sub.add_parser("demo", parents=[quiet], help="the main job on ShapesWorld",
                          description="Generate ShapesWorld, inspect it, read it through the "
                                      "pipeline, and write report.md/json and PNGs.")
    demo.add_argument("--out", help="run directory (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a few hundred samples only")
    demo.add_argument("--config", help="YAML with DemoConfig keys")
    demo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_train=500")
    demo.set_defaults(fn=cmd_demo)
    return p


def _leaf(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser the command line selects, followed through the subcommand names."""
    p = parser
    for t in argv:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        p = subs[0].choices.get(t, p)
    return p


def _split_overrides(leaf: argparse.ArgumentParser, argv: list[str]) -> tuple[list, list]:
    """(argv without the overrides, the overrides): every token with "=" that is neither an
    option nor an option's value, wherever it stands (argparse would bind positionals too
    early); malformed ones included, so that they are reported, not dropped."""
    takes_value = {s for a in leaf._actions if a.option_strings and a.nargs != 0
                   for s in a.option_strings}
    rest, overrides = [], []
    for k, t in enumerate(argv):
        is_value = k > 0 and argv[k - 1] in takes_value
        (overrides if "=" in t and not t.startswith("-") and not is_value else rest).append(t)
    return rest, overrides


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _describe(e: Exception) -> tuple[int, str]:
    """(exit status, one-line message) of an error that reached the command boundary."""
    if isinstance(e, OmnimaskError):
        return EXIT_BAD_INPUT, _one_line(e)
    if isinstance(e, OSError) and e.strerror:  # unwritable/missing/full: name the path
        where = ", ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return EXIT_BAD_INPUT, f"{where}: {e.strerror}" if where else e.strerror
    if isinstance(e, (OSError, ValueError)):
        return EXIT_BAD_INPUT, _one_line(e)
    return EXIT_FAILED, (f"unexpected {type(e).__name__}: {_one_line(e)} (run with --debug "
                         "for the traceback)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("OMNIMASK_DEBUG", "") not in ("", "0")
    argv = [t for t in argv if t != "--debug"]
    parser = build_parser()
    leaf = _leaf(parser, argv)
    overrides: list[str] = []
    if any(a.dest == "overrides" for a in leaf._actions):
        argv, overrides = _split_overrides(leaf, argv)
        args, stray = parser.parse_known_args(argv)
        if any(t.startswith("-") for t in stray):
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        # positionals without "=" (bound by argparse or left over): keys without a value
        overrides = [*args.overrides, *stray, *overrides]
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if hasattr(args, "overrides"):
            for t in overrides:
                check_override(t)
            args.overrides = overrides
        return args.fn(args)
    except Interrupted as e:
        print(f"omnimask: {_one_line(e)}; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("omnimask: interrupted", file=sys.stderr)
        return EXIT_CTRL_C
    except Exception as e:
        if debug:
            raise
        code, msg = _describe(e)
        print(f"omnimask: error: {msg}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
