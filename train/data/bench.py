"""``omnimask bench data``: read + decode + process throughput, against plain webdataset.

The peer is webdataset's own idiomatic pipeline over the same shards in the same run
(``WebDataset(...).shuffle(...).decode("pil")`` then the same conversion to tensors), so
the ratio says what our resumable, fault-counting reader costs or saves.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import numpy as np
import torch

from omnimask.config import DataConfig

from .pipeline import ShardLoader, as_is, collate
from .shards import expand_shards

IMAGE_TEXT_MASKS = ["image", "masks", "text"]
ALL_LABELS = ["image", "masks", "text", "qa", "refs", "meta"]


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    from omnimask.train.trainer import native_bf16

    # the vector ISA torch dispatches to (e.g. AVX2 | AVX512) and native bf16 tell apart
    # CPUs of one model name (EPYC generations differ 2-3x in these benches)
    return {"hostname": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16("cpu"),
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


def _time_loader(shards, processors, batch_size, workers, repeats) -> dict:
    best = None
    for _ in range(repeats):
        cfg = DataConfig(shards=shards, processors=processors, batch_size=batch_size,
                         num_workers=workers, shuffle_buffer=1000, seed=0)
        loader = ShardLoader(cfg, rank=0, world_size=1)
        t0 = time.perf_counter()
        n = sum(len(b["__key__"]) for b in loader)
        dt = time.perf_counter() - t0
        if best is None or n / dt > best["samples_per_s"]:
            best = {"samples": n, "seconds": round(dt, 3), "samples_per_s": round(n / dt, 1),
                    "bad": loader.stats()["bad"]}
    consumers = max(workers, 1)
    best["workers"] = workers
    best["per_worker_samples_per_s"] = round(best["samples_per_s"] / consumers, 1)
    return best


_PEER_MEMBERS = (".image.png", ".seg.png", ".inst.png", ".caption.txt")


def _webdataset_peer(shards, batch_size, workers, repeats) -> dict:
    import webdataset as wds

    def to_tensors(s):
        return {"image": torch.from_numpy(np.array(s["image.png"].convert("RGB"))).permute(2, 0, 1),
                "seg": torch.from_numpy(np.array(s["seg.png"])),
                "inst": torch.from_numpy(np.array(s["inst.png"])),
                "captions": s["caption.txt"].splitlines()}

    best = None
    for _ in range(repeats):
        ds = (wds.WebDataset(shards, shardshuffle=False, nodesplitter=wds.split_by_node,
                             workersplitter=wds.split_by_worker, empty_check=False,
                             select_files=lambda f: f.endswith(_PEER_MEMBERS))
              .shuffle(1000).decode("pil", only=["image.png", "seg.png", "inst.png", "caption.txt"])
              .map(to_tensors)
              .batched(batch_size, collation_fn=collate))
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                         collate_fn=as_is)
        t0 = time.perf_counter()
        n = sum(len(b["captions"]) for b in dl)
        dt = time.perf_counter() - t0
        if best is None or n / dt > best["samples_per_s"]:
            best = {"samples": n, "seconds": round(dt, 3), "samples_per_s": round(n / dt, 1)}
    best["workers"] = workers
    best["per_worker_samples_per_s"] = round(best["samples_per_s"] / max(workers, 1), 1)
    return best


def bench_data(shards=None, num: int = 2000, batch_size: int = 64, workers: int | None = None,
               repeats: int = 3, vs: str | None = "webdataset", progress: bool = True) -> dict:
    """Measure samples/s on one core (in-process) and with ``workers`` worker processes."""
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    tmp = None
    if not shards:
        from .shapesworld import generate_shards

        tmp = tempfile.TemporaryDirectory(prefix="omnimask-bench-")
        generate_shards(tmp.name, num, seed=0, split="train", shard_size=max(num // 4, 1),
                        speech=True, progress=progress)
        shards = [os.path.join(tmp.name, "train-*.tar")]
    shards = expand_shards(shards)
    try:
        result = {"bench": "data", "device": "cpu", "machine": machine(),
                  "config": {"shards": len(shards), "batch_size": batch_size,
                             "shuffle_buffer": 1000, "repeats": repeats,
                             "paths": {"omnimask": IMAGE_TEXT_MASKS, "all_labels": ALL_LABELS,
                                       "speech": ["speech"], "webdataset": IMAGE_TEXT_MASKS}},
                  "omnimask": {}, "all_labels": {}, "speech": {}}
        for w in sorted({0, workers}):
            label = "one_core" if w == 0 else f"workers_{w}"
            result["omnimask"][label] = _time_loader(shards, IMAGE_TEXT_MASKS, batch_size, w, repeats)
            result["all_labels"][label] = _time_loader(shards, ALL_LABELS, batch_size, w, repeats)
            result["speech"][label] = _time_loader(shards, ["speech"], batch_size, w, repeats)
        if vs == "webdataset":
            result["webdataset"] = {}
            for w in sorted({0, workers}):
                label = "one_core" if w == 0 else f"workers_{w}"
                result["webdataset"][label] = _webdataset_peer(shards, batch_size, w, repeats)
            ours = result["omnimask"]["one_core"]["samples_per_s"]
            peer = result["webdataset"]["one_core"]["samples_per_s"]
            result["ratio"] = round(ours / peer, 3)
        result["tokens_per_s"] = None
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()
