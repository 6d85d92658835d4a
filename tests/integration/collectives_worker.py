"""Cross-rank pieces under torchrun (tests/integration/test_distributed.py): ITC scores each
rank's rows against every rank's; the VQ's EMA codebook update sums every rank's
statistics. Writes each rank's results as JSON into the folder given."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from omnimask.heads.matching import info_nce
from omnimask.modalities.image.vq import Quantizer, VQConfig


def rows(seed: int, n: int = 8, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), \
        torch.randn(n, d, generator=g, dtype=torch.float64)


def quantizer(dead_after: int) -> Quantizer:
    """16 codes; ``latents`` leave most unused (they die after ``dead_after`` idle steps)."""
    torch.manual_seed(0)
    q = Quantizer(VQConfig(quantizer="vq", codebook_size=16, code_dim=4,
                           dead_after=dead_after)).train()
    q.init_kmeans(F.normalize(torch.randn(64, 4), dim=-1), 0)
    return q


def latents(step: int, n: int = 24) -> torch.Tensor:
    """Rows near 3 directions: most codes stay unused and are restarted."""
    g = torch.Generator().manual_seed(100 + step)
    centres = torch.eye(4)[:3]
    return centres[torch.arange(n) % 3] + 0.05 * torch.randn(n, 4, generator=g)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t_all, v_all = rows(0)
    per = len(t_all) // world
    t = t_all[rank * per:(rank + 1) * per].clone().requires_grad_()
    v = v_all[rank * per:(rank + 1) * per].clone().requires_grad_()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss = info_nce(F.normalize(t, dim=-1), F.normalize(v, dim=-1), scale)
    loss.backward()
    with torch.no_grad():  # evaluation: each rank's own rows only
        local = float(info_nce(F.normalize(t, dim=-1), F.normalize(v, dim=-1), scale))
    out = {}
    for name, dead_after in (("no_restarts", 100), ("restarts", 2)):
        q = quantizer(dead_after)
        for step in range(3):
            z = latents(step)
            q(z[rank * len(z) // world:(rank + 1) * len(z) // world])
        out[name] = {"codebook": q.codebook.tolist(), "ema_count": q.ema_count.tolist()}
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps({"rank": rank, "loss": float(loss.detach()), "t_grad": t.grad.tolist(),
                      "v_grad": v.grad.tolist(), "scale_grad": float(scale.grad),
                      "no_grad_loss": local, **out}))
    dist.barrier()
    dist.destroy_process_group()
    # skip interpreter finalisation: gloo's threads can still hold tensors of the autograd
    # all_gather there and abort the process after its work is done (pytorch PR 179291)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
