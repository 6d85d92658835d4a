"""ITC's cross-rank negatives under torchrun (tests/integration/test_distributed.py): each
rank scores its rows against every rank's; prints its loss and gradients as JSON."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.nn.functional as F

from omnimask.heads.matching import info_nce


def rows(seed: int, n: int = 8, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), \
        torch.randn(n, d, generator=g, dtype=torch.float64)


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
    print(json.dumps({"rank": rank, "loss": float(loss), "t_grad": t.grad.tolist(),
                      "v_grad": v.grad.tolist(), "scale_grad": float(scale.grad),
                      "no_grad_loss": local}))
    dist.destroy_process_group()
