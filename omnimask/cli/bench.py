"""``omnimask bench data|trunk|tokenizer``: benchmarks, results as JSON."""

from __future__ import annotations

import argparse

from ..config import PRECISIONS
from ..errors import OmnimaskError
from .common import QUIET, _at_least, _write_json


def cmd_bench_tokenizer(a: argparse.Namespace) -> int:
    from ..bench_tokenizer import bench_tokenizer

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
    from ..bench_trunk import bench_trunk
    from ..train.trainer import device_problem

    _at_least(*((f"--{k.replace('_', '-')}", getattr(a, k), 0 if k == "warmup" else 1)
                for k in ("layers", "dim", "heads", "ffn", "vocab", "batch", "min_len",
                          "max_len", "steps", "warmup")),
              ("--threads", a.threads or 1, 1), ("--rounds", a.rounds, 1))
    if a.dim % a.heads:
        raise OmnimaskError(f"--dim {a.dim} is not divisible by --heads {a.heads}")
    if a.min_len > a.max_len:
        raise OmnimaskError(f"--min-len {a.min_len} is above --max-len {a.max_len}")
    if a.device and device_problem(a.device):
        raise OmnimaskError(f"--device {device_problem(a.device)}")
    res = bench_trunk(a.layers, a.dim, a.heads, a.ffn, a.vocab, a.batch, a.min_len, a.max_len,
                      a.steps, a.warmup, a.device, compile=a.compile, threads=a.threads,
                      rounds=a.rounds, dtype=a.dtype,
                      progress=None if a.quiet else lambda m: print(f"running {m}", flush=True))
    print(trunk_table(res))
    _write_json(res, a.out)
    return 0


def trunk_table(res: dict) -> str:
    """The bench's result as a Markdown table: one row per (lengths, side)."""
    lo, hi = res["config"]["lengths"]
    rows = ["| lengths | side | real tokens/s | ratio | MFLOP/token | GFLOP/s | of matmul peak "
            "| peak memory | warm-up | attention |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, name in (("variable", f"{lo}-{hi}"), ("full_length", f"{hi}")):
        for side in ("omnimask", "hf"):
            r = res[key][side]
            ratio = f"{res[key]['ratio']:.2f}x" if side == "omnimask" else "1"
            rows.append(f"| {name} | {side} | {r['tokens_per_s']:.0f} | {ratio} | "
                        f"{r['mflop_per_token']:.1f} | {r['gflop_per_s']:.0f} | "
                        f"{r['peak_fraction']:.2f} of {r['matmul_peak_gflop_per_s']:.0f} | "
                        f"{r['peak_mem_mb']:.0f} MB | {r['warmup_s']:.1f} s | "
                        f"{r.get('attention', '')} |")
    return "\n".join(rows)


def cmd_bench(a: argparse.Namespace) -> int:
    from ..train.data.bench import bench_data

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


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (results as JSON)")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    bd = bsub.add_parser("data", parents=[QUIET], help="read+decode+process throughput vs plain webdataset",
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
    btr = bsub.add_parser("trunk", parents=[QUIET], help="MLM training step vs transformers",
                          description="Tokens/s of an MLM training step (fwd, bwd, AdamW) of the "
                                      "trunk and of transformers' BertForMaskedLM (SDPA), same "
                                      "sizes and batches, each configuration in its own "
                                      "process; FLOPs counted, against the measured matmul "
                                      "peak.")
    btr.add_argument("--vs", choices=["hf"], default="hf", help="the peer (transformers BERT)")
    for flag, default in (("--layers", 4), ("--dim", 256), ("--heads", 4), ("--ffn", 1024),
                          ("--vocab", 8192), ("--batch", 16), ("--min-len", 32),
                          ("--max-len", 256), ("--steps", 10), ("--warmup", 2)):
        btr.add_argument(flag, type=int, default=default)
    btr.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    btr.add_argument("--compile", action="store_true",
                     help="torch.compile both sides' loss (warm-up time reported)")
    btr.add_argument("--dtype", choices=PRECISIONS, default="auto",
                     help="both sides' step: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 "
                          "= bf16 autocast (CPUs with native bf16), against the bf16 peak")
    btr.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    btr.add_argument("--rounds", type=int, default=3,
                     help="processes per configuration, in turn; each side keeps its best")
    btr.add_argument("--out", help="write the result JSON here")
    btr.set_defaults(fn=cmd_bench_trunk)
    btk = bsub.add_parser("tokenizer", parents=[QUIET], help="tokenizer encode throughput",
                          description="VQ encode/decode images/s and speech encode seconds of "
                                      "audio per second (BEST-RQ and k-means).")
    btk.add_argument("--data", nargs="*", help="shards with images and speech (default: "
                                               "generate ShapesWorld)")
    btk.add_argument("--image-tokenizer", help="a trained image tokenizer (default: untrained)")
    btk.add_argument("--num", type=int, default=200, help="samples to generate if no --data")
    btk.add_argument("--repeats", type=int, default=3)
    btk.add_argument("--out", help="write the result JSON here")
    btk.set_defaults(fn=cmd_bench_tokenizer)
