"""``omnimask bench trunk --vs hf``: an MLM training step of our trunk against transformers'
``BertForMaskedLM`` (SDPA attention), same sizes and weights, same variable-length batches.

Both models step (forward, backward, AdamW) alternately in one process after warm-up;
throughput counts real (non-pad) tokens. Our side packs without padding and projects
only the masked positions to the vocabulary; theirs pads to the longest sample and
projects every position. On CUDA: bf16 autocast, peak memory, achieved TFLOP/s
(``torch.utils.flop_counter``) and MFU against a measured bf16 matmul peak.
"""

from __future__ import annotations

import time

import torch

from .fusion.packing import IGNORE, Segment, pack
from .fusion.trunk import Trunk
from .train.data.bench import machine


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


def _ours(samples, device):
    b = pack([[Segment("text", ids=i, targets=t)] for i, t in samples])
    for f in ("ids", "modality", "segment", "position", "position_2d", "targets"):
        setattr(b, f, getattr(b, f).to(device))
    return b


def _theirs(samples, device):
    L = max(len(i) for i, _ in samples)
    ids = torch.zeros(len(samples), L, dtype=torch.long)
    att = torch.zeros_like(ids)
    lab = torch.full_like(ids, IGNORE)
    for r, (i, t) in enumerate(samples):
        ids[r, :len(i)], att[r, :len(i)], lab[r, :len(i)] = i, 1, t
    return ids.to(device), att.to(device), lab.to(device)


def _matmul_peak(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize(device)
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t0)


def bench_trunk(layers=4, dim=256, heads=4, ffn=1024, vocab=8192, batch=16, min_len=32,
                max_len=256, steps=10, warmup=2, device: str | None = None, seed=0) -> dict:
    from transformers import BertConfig, BertForMaskedLM

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=ffn,
                     max_position_embeddings=max(512, max_len), hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    hf = BertForMaskedLM(cfg).to(dev).train()
    ours = Trunk.from_hf_bert(hf).to(dev).train()
    opt = {"omnimask": torch.optim.AdamW(ours.parameters(), 1e-4),
           "hf": torch.optim.AdamW(hf.parameters(), 1e-4)}

    def step(name, samples):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            if name == "omnimask":
                loss = ours.mlm_loss(_ours(samples, dev))
            else:
                ids, att, lab = _theirs(samples, dev)
                loss = hf(input_ids=ids, attention_mask=att, labels=lab).loss
        opt[name].zero_grad(set_to_none=True)
        loss.backward()
        opt[name].step()

    def run(lo, hi) -> dict:
        data = _batches(steps + warmup, batch, lo, hi, vocab, seed)
        res = {}
        for name in ("omnimask", "hf"):
            for s in data[:warmup]:
                step(name, s)
        times = {"omnimask": 0.0, "hf": 0.0}
        tokens = sum(len(i) for s in data[warmup:] for i, _ in s)
        for s in data[warmup:]:  # alternate, so both see the same machine state
            for name in ("omnimask", "hf"):
                if cuda:
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                step(name, s)
                if cuda:
                    torch.cuda.synchronize(dev)
                times[name] += time.perf_counter() - t0
        for name in ("omnimask", "hf"):
            res[name] = {"tokens_per_s": round(tokens / times[name], 1), "peak_mem_mb": None}
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
                step(name, data[0])
                res[name]["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        res["ratio"] = round(res["omnimask"]["tokens_per_s"] / res["hf"]["tokens_per_s"], 3)
        if cuda:
            from torch.utils.flop_counter import FlopCounterMode

            peak = _matmul_peak(dev)
            for name in ("omnimask", "hf"):
                with FlopCounterMode(display=False) as fc:
                    step(name, data[0])
                tok0 = sum(len(i) for i, _ in data[0])
                tflops = fc.get_total_flops() / tok0 * res[name]["tokens_per_s"]
                res[name]["tflops"] = round(tflops / 1e12, 2)
                res[name]["mfu"] = round(tflops / peak, 4)
            res["mfu"] = res["omnimask"]["mfu"]
            res["peak_bf16_matmul_tflops"] = round(peak / 1e12, 1)
        return res

    variable = run(min_len, max_len)
    full = run(max_len, max_len)
    return {"bench": "trunk", "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
            "machine": machine(),
            "config": {"layers": layers, "dim": dim, "heads": heads, "ffn": ffn, "vocab": vocab,
                       "batch": batch, "lengths": [min_len, max_len], "steps": steps,
                       "warmup": warmup, "threads": torch.get_num_threads(),
                       "dtype": "bf16 autocast" if cuda else "float32",
                       "attention_backend": "auto", "hf_attention": "sdpa"},
            **variable, "full_length": full}
