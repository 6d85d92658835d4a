"""ShapesWorld preparation shared by ``omnimask demo`` and ``pretrain`` with ``prepare=true``:
generate the four splits into ``RUN/data`` and train the three tokenizers into
``RUN/tokenizers/{text,speech,image}`` (the ``runs/demo`` layout the configs name)."""

from __future__ import annotations

import time
from pathlib import Path

from .generate import generate_shards


def split_sizes(num_train: int, num_val: int, num_test: int, num_test_novel: int,
                quick: bool = False) -> dict[str, int]:
    """Samples per split; ``quick``: a tenth of each (at least one)."""
    sizes = {"train": num_train, "val": num_val, "test": num_test,
             "test-novel": num_test_novel}
    return {k: max(1, v // 10) for k, v in sizes.items()} if quick else sizes


def generate_splits(out: str | Path, sizes: dict[str, int], seed: int = 0,
                    image_size: int = 64, shard_size: int = 500, workers: int = 0,
                    progress: bool = True, train_question_rounds: int = 1) -> dict:
    """Shards with speech for every split in ``sizes`` under ``out``; per split: samples,
    shards, megabytes and samples generated per second. ``train_question_rounds``: the
    train split's question programs drawn that many times per scene (the evaluation
    splits keep one round)."""
    stats = {}
    for split, n in sizes.items():
        t0 = time.perf_counter()
        e = generate_shards(out, n, seed=seed, split=split, image_size=image_size,
                            shard_size=shard_size, speech=True, workers=workers,
                            progress=progress,
                            question_rounds=train_question_rounds if split == "train" else 1)
        dt = time.perf_counter() - t0
        stats[split] = {"samples": e["num"], "shards": len(e["shards"]),
                        "mbytes": round(sum(s["bytes"] for s in e["shards"]) / 2**20, 1),
                        "samples_per_s": round(e["num"] / dt, 1)}
    return stats


def train_tokenizers(data: str | Path, out: str | Path, speech_units: int = 500,
                     vq_codes: int = 128, vq_steps: int = 1400, vq_max_minutes: float = 0.0,
                     grid: str | Path | None = None,
                     progress: bool = True, vq_precision: str = "fp32", vq_crop: int = 0,
                     vq_depth: int = 1) -> dict:
    """Train the text BPE, k-means speech units and the image VQ on ``data``'s train split
    into ``out/<kind>`` and measure each on the val split; ``grid``: where the VQ's
    reconstruction grid goes; ``vq_precision``: the VQ's training convolutions (fp32, bf16,
    auto); ``vq_crop``: its training crops' side in pixels (0: whole images); ``vq_depth`` >
    1: residual quantisation, that many levels of ``vq_codes`` codes per position. Per
    kind: its metrics and ``train_and_eval_seconds``."""
    from omnimask.registry import TOKENIZERS

    data, out = Path(data), Path(out)
    train, val = [str(data / "train-*.tar")], [str(data / "val-*.tar")]
    plans = [("text", [], {}),
             # k-means fitted on a sample of 100k frames (200 per unit), not on every frame
             ("speech", ["kind=kmeans", f"codebook_size={speech_units}", "max_frames=100000"], {}),
             # the demo's tokens on 8 px patches (8 x 8 positions), not the 16 x 16 FSQ
             # default: its pretraining reads 64 positions per image, a quarter of the
             # default's; residual levels (rq, losses weighted to objects) keep the shapes
             ("image", [*(["vq.quantizer=rq", f"vq.rq_depth={vq_depth}", "object_weight=4",
                           "edge_weight=0.5"] if vq_depth > 1 else
                          ["vq.quantizer=vq", "object_weight=0", "edge_weight=0"]),
                        "vq.downsample=3", f"max_steps={vq_steps}", f"max_minutes={vq_max_minutes}",
                        f"vq.codebook_size={vq_codes}", f"precision={vq_precision}",
                        f"crop={vq_crop}"],
              {"grid": str(grid) if grid is not None else None})]
    metrics: dict = {}
    for kind, overrides, eval_kwargs in plans:
        t0 = time.perf_counter()
        ops = TOKENIZERS.get(kind)
        trained = ops.train(train, str(out / kind), overrides, progress=progress)
        m = ops.evaluate(str(out / kind), val, progress=progress, **eval_kwargs)
        if kind == "image":  # whether the time cap cut it
            m |= {"steps": trained.get("steps"), "max_steps": vq_steps,
                  "precision": trained.get("precision")}
        m["train_and_eval_seconds"] = round(time.perf_counter() - t0, 1)
        metrics[kind] = m
    return metrics
