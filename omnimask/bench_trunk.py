"""``omnimask bench trunk --vs hf``: an MLM training step of our trunk against transformers'
``BertForMaskedLM`` (SDPA attention), same sizes and weights, same variable-length batches.

Each (side, lengths) configuration runs in its own Python process (a configuration changes
the allocator's and oneDNN's state for the ones after it), one after another on the same
machine, for several rounds in turn; each side keeps its fastest round. A process measures
this machine's matmul peak before and after its steps, in the dtype both sides step in
(the better of the two), warms up (compilation included, timed), times ``steps`` steps
(forward, backward, fused AdamW on both sides, as transformers' Trainer defaults to on
torch >= 2.8), counts one step's FLOPs with ``torch.utils.flop_counter`` (the CPU
flash-attention kernels added) and reports real (non-pad) tokens/s, FLOPs per real token,
achieved GFLOP/s, the fraction of the peak, peak memory (CUDA: allocated; CPU: the
process's peak RSS) and the attention paths each side ran. Our side packs without
padding and computes the last layer and the vocabulary projection only at masked
positions; theirs pads to the longest sample and projects every position. On CUDA both
run under bf16 autocast and the fraction is the MFU; ``dtype="bf16"`` runs both sides
under bf16 autocast on CPU too (CPUs with native bf16 matmuls, e.g. AVX512-BF16 or AMX),
against the bf16 matmul peak.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import torch

from .config import PRECISIONS
from .fusion.packing import IGNORE, Segment, pack
from .fusion.trunk import Trunk
from .train.data.bench import machine
from .train.trainer import warn_emulated_bf16

SIDES = ("omnimask", "hf")


def _batches(n_batches, batch, lo, hi, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        lens = torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
        samples = []
        for n in lens:
            ids = torch.randint(5, vocab, (n,), generator=g)
            m = torch.rand(n, generator=g) < 0.15
            m[torch.randint(n, (1,), generator=g)] = True
            samples.append((ids.where(~m, torch.full_like(ids, 4)), ids.where(m, IGNORE)))
        out.append(samples)
    return out


def packed(samples, device):
    return pack([[Segment("text", ids=i, targets=t)] for i, t in samples]).to(device)


def padded(samples, device):
    L = max(len(i) for i, _ in samples)
    ids = torch.zeros(len(samples), L, dtype=torch.long)
    att = torch.zeros_like(ids)
    lab = torch.full_like(ids, IGNORE)
    for r, (i, t) in enumerate(samples):
        ids[r, :len(i)], att[r, :len(i)], lab[r, :len(i)] = i, 1, t
    return ids.to(device), att.to(device), lab.to(device)


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def step_dtype(dev: torch.device, dtype: str = "auto") -> torch.dtype:
    """What the timed steps compute in: ``auto`` is bf16 autocast on CUDA, fp32 elsewhere."""
    if dtype not in PRECISIONS:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(PRECISIONS)}")
    bf16 = dtype == "bf16" or (dtype == "auto" and dev.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def matmul_peak(dev: torch.device, dtype: torch.dtype | None = None) -> float:
    """FLOP/s of the best of several square matmuls in ``dtype`` (default: the device's
    ``step_dtype``): 8192^2 on CUDA, up to 1536^2 on CPU, smaller where one would take
    longer than ~0.5 s (emulated bf16 runs ~1 GFLOP/s: 1536^2 would take minutes)."""
    dtype = dtype or step_dtype(dev)

    def timed(n: int, reps: int) -> float:
        a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
        c = torch.empty(n, n, device=dev, dtype=dtype)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        _sync(dev)
        return time.perf_counter() - t0

    if dev.type == "cuda":
        n, reps = 8192, 10
    else:
        n, took = 256, min(timed(256, 1) for _ in range(2))  # the first call warms up
        while n < 1536 and took * (min(2 * n, 1536) / n) ** 3 < 0.5:
            n = min(2 * n, 1536)
            took = timed(n, 1)
        reps = max(1, min(4, int(0.4 / max(took, 1e-9))))
    return max(reps * 2 * n ** 3 / timed(n, reps) for _ in range(5))


def _flop_mapping() -> dict:
    """The CPU flash-attention ops the counter does not know, counted as its SDPA ops are."""
    from torch.utils import flop_counter as fc

    def fwd(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    aten = torch.ops.aten
    names = (("_scaled_dot_product_flash_attention_for_cpu", fwd),
             ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd))
    return {getattr(aten, n): fn for n, fn in names if hasattr(aten, n)}


def _models(spec: dict, dev: torch.device):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(spec["seed"])
    cfg = BertConfig(vocab_size=spec["vocab"], hidden_size=spec["dim"],
                     num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                     intermediate_size=spec["ffn"],
                     max_position_embeddings=max(512, spec["lengths"][1]),
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation="sdpa")
    hf = BertForMaskedLM(cfg)
    return (Trunk.from_hf_bert(hf) if spec["side"] == "omnimask" else hf).to(dev).train()


def measure(spec: dict) -> dict:
    """One side on one length range, in this process (see the module docstring)."""
    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    dtype = step_dtype(dev, spec.get("dtype", "auto"))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = _models(spec, dev)
    ours = spec["side"] == "omnimask"
    if ours:
        loss_of = model.mlm_loss
    else:
        def loss_of(ids, att, lab):
            return model(input_ids=ids, attention_mask=att, labels=lab).loss
    if spec.get("compile") and ours:
        model.compile_blocks()
    elif spec.get("compile"):
        loss_of = torch.compile(loss_of, dynamic=True)
    opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=True)
    data = _batches(spec["steps"] + spec["warmup"], spec["batch"], *spec["lengths"],
                    spec["vocab"], spec["seed"])
    inputs = [packed(s, dev) if ours else padded(s, dev) for s in data]

    def step(x):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_of(x) if ours else loss_of(*x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    peak = matmul_peak(dev, dtype)
    t0 = time.perf_counter()
    for x in inputs[:spec["warmup"]]:
        step(x)
    _sync(dev)
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for x in inputs[spec["warmup"]:]:
        step(x)
    _sync(dev)
    seconds = time.perf_counter() - t0
    peak = max(peak, matmul_peak(dev, dtype))  # before and after: a busy moment lowers one only
    tokens = sum(len(i) for s in data[spec["warmup"]:] for i, _ in s)
    mem = (torch.cuda.max_memory_allocated(dev) if cuda
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as fc:
        step(inputs[-1])
    per_token = fc.get_total_flops() / sum(len(i) for i, _ in data[-1])
    rate = tokens / seconds
    return {"tokens_per_s": round(rate, 1), "step_ms": round(1e3 * seconds / spec["steps"], 1),
            "mflop_per_token": round(per_token / 1e6, 2),
            "gflop_per_s": round(per_token * rate / 1e9, 1),
            "matmul_peak_gflop_per_s": round(peak / 1e9, 1),
            "peak_fraction": round(per_token * rate / peak, 3),
            "peak_mem_mb": round(mem / 2 ** 20, 1), "warmup_s": round(warmup_s, 2),
            "attention": _attention_used() if ours else "sdpa (padded)"}


def _attention_used() -> str:
    """The attention paths this process ran, the most called first (e.g. ``varlen, varlen
    rows``: every layer packed, the last one's masked rows too)."""
    from .fusion.attention import RAN

    return ", ".join(name for name, _ in RAN.most_common()) or "none"


def _in_process(spec: dict) -> dict:
    """``measure(spec)`` in a fresh interpreter (the same one running this)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "omnimask.bench_trunk", json.dumps(spec)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"bench trunk: the {spec['side']} process failed: {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_trunk(layers=4, dim=256, heads=4, ffn=1024, vocab=8192, batch=16, min_len=32,
                max_len=256, steps=10, warmup=2, device: str | None = None, seed=0,
                compile: bool = False, threads: int | None = None, isolate: bool = True,
                rounds: int = 3, dtype: str = "auto", progress=None) -> dict:
    """Both sides on lengths uniform in [min_len, max_len] and at max_len; each
    configuration in its own process (unless ``isolate=False``: tests), ``rounds`` times
    in turn; each side keeps its fastest round (a shared machine only ever slows a run
    down), and every round's tokens/s is kept."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = step_dtype(dev, dtype) == torch.bfloat16
    if bf16:
        warn_emulated_bf16("bench trunk --dtype", dev)
    base = {"layers": layers, "dim": dim, "heads": heads, "ffn": ffn, "vocab": vocab,
            "batch": batch, "steps": steps, "warmup": warmup, "device": str(dev),
            "seed": seed, "compile": compile, "threads": threads, "dtype": dtype}
    run = _in_process if isolate else measure
    out = {}
    for key, lengths in (("variable", [min_len, max_len]), ("full_length", [max_len, max_len])):
        res: dict = {}
        for r in range(rounds):
            for side in SIDES:
                if progress:
                    progress(f"{side}, lengths {lengths[0]}-{lengths[1]}, round {r + 1} of "
                             f"{rounds}")
                got = run({**base, "side": side, "lengths": lengths})
                best = res.get(side)
                rates = (best or {}).get("rounds_tokens_per_s", []) + [got["tokens_per_s"]]
                if best is None or got["tokens_per_s"] > best["tokens_per_s"]:
                    best = got
                res[side] = {**best, "rounds_tokens_per_s": rates}
        res["ratio"] = round(res["omnimask"]["tokens_per_s"] / res["hf"]["tokens_per_s"], 3)
        out[key] = res
    return {"bench": "trunk", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else "cpu", "machine": machine(),
            "config": {**{k: v for k, v in base.items() if k not in ("device", "seed")},
                       "lengths": [min_len, max_len],
                       "threads": threads or torch.get_num_threads(),
                       "dtype": "bf16 autocast" if bf16 else "float32",
                       "optimizer": "AdamW(fused=True) on both sides",
                       "attention_backend": "auto", "hf_attention": "sdpa",
                       "isolated_processes": isolate, "rounds": rounds},
            **out}


if __name__ == "__main__":  # one configuration: python -m omnimask.bench_trunk SPEC_JSON
    import warnings

    warnings.simplefilter("ignore")
    print(json.dumps(measure(json.loads(sys.argv[1]))))
