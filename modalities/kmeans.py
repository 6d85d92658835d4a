"""k-means shared by the speech units and the VQ codebook initialisation.

k-means++ initialisation on a subsample, Lloyd iterations over all points (chunked
distances), empty clusters re-seeded at the worst-served points.
"""

from __future__ import annotations

import torch
from tqdm import tqdm


def sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)[None]).clamp_min_(0)


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 2048
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance for each row of ``x``, in chunks of rows small
    enough that their distance block stays in cache (2x faster than 65536, same bits)."""
    ids, d2 = [], []
    for i in range(0, x.shape[0], chunk):
        m, j = sq_dists(x[i:i + chunk], centroids).min(1)
        ids.append(j)
        d2.append(m)
    return torch.cat(ids), torch.cat(d2)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iterations: int = 25, seed: int = 0, init_sample: int = 20000,
           progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Return (centroids [k, d], stats with inertia, its history and usage)."""
    x = x.float()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    g = torch.Generator().manual_seed(seed)
    sub = x[torch.randperm(n, generator=g)[: max(init_sample, k)]]
    cents = [sub[torch.randint(sub.shape[0], (1,), generator=g)]]
    best = sq_dists(sub, cents[0])[:, 0]
    for _ in range(1, k):
        if best.sum() > 0:
            j = torch.multinomial(best / best.sum(), 1, generator=g)
        else:
            j = torch.randint(sub.shape[0], (1,), generator=g)
        cents.append(sub[j])
        best = torch.minimum(best, sq_dists(sub, cents[-1])[:, 0])
    c = torch.cat(cents)
    history = []
    for _ in tqdm(range(iterations), desc="k-means", unit="iter", disable=not progress):
        ids, d2 = assign(x, c)
        history.append(float(d2.mean()))
        counts = torch.bincount(ids, minlength=k).float()
        sums = torch.zeros_like(c).index_add_(0, ids, x)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            c[empty] = x[d2.topk(int(empty.sum())).indices]
    ids, d2 = assign(x, c)
    return c, {"inertia": float(d2.mean()), "inertia_history": history,
               "usage": float((torch.bincount(ids, minlength=k) > 0).float().mean())}
