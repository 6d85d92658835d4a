"""Speech codebooks: a frozen BEST-RQ random-projection quantizer and k-means units.

BEST-RQ (Chiu et al. 2022; speechbrain's ``quantisers.py``): a Xavier-initialised
projection to a small dimension and a Gaussian codebook, both l2-normalised, frozen and
made from a seed; a frame's unit is the nearest codeword (the largest cosine).
HuBERT-style units: k-means (k-means++ initialisation, Lloyd iterations, empty clusters
re-seeded from the farthest points) fitted on the same features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm


class BestRQ(torch.nn.Module):
    def __init__(self, input_dim: int, codebook_size: int = 1024, code_dim: int = 16,
                 seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        proj = torch.empty(input_dim, code_dim)
        bound = (6.0 / (input_dim + code_dim)) ** 0.5  # Xavier uniform
        proj.uniform_(-bound, bound, generator=g)
        codebook = F.normalize(torch.randn(codebook_size, code_dim, generator=g), dim=-1)
        self.register_buffer("projection", proj)  # buffers: nothing here is trainable
        self.register_buffer("codebook", codebook)

    @property
    def size(self) -> int:
        return self.codebook.shape[0]

    @torch.no_grad()
    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """[..., input_dim] -> [...] unit ids."""
        z = F.normalize(feats.float() @ self.projection, dim=-1)
        return (z @ self.codebook.T).argmax(-1)


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)[None]).clamp_min_(0)


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance for each row of ``x`` (chunked)."""
    ids, d2 = [], []
    for i in range(0, x.shape[0], chunk):
        d = _sq_dists(x[i:i + chunk], centroids)
        m, j = d.min(1)
        ids.append(j)
        d2.append(m)
    return torch.cat(ids), torch.cat(d2)


class KMeansUnits(torch.nn.Module):
    def __init__(self, centroids: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("centroids", centroids)

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    @torch.no_grad()
    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        shape = feats.shape[:-1]
        return assign(feats.reshape(-1, feats.shape[-1]).float(), self.centroids)[0].reshape(shape)

    @classmethod
    @torch.no_grad()
    def fit(cls, x: torch.Tensor, k: int, iterations: int = 25, seed: int = 0,
            init_sample: int = 20000, progress: bool = True) -> tuple[KMeansUnits, dict]:
        """Lloyd's algorithm from a k-means++ start; returns the model and fit statistics."""
        x = x.float()
        n = x.shape[0]
        if n < k:
            raise ValueError(f"k-means needs at least k={k} frames, got {n}")
        g = torch.Generator().manual_seed(seed)
        # k-means++ on a subsample
        sub = x[torch.randperm(n, generator=g)[: max(init_sample, k)]]
        cents = [sub[torch.randint(sub.shape[0], (1,), generator=g)]]
        best = _sq_dists(sub, cents[0])[:, 0]
        for _ in range(1, k):
            j = torch.multinomial(best / best.sum(), 1, generator=g) if best.sum() > 0 else \
                torch.randint(sub.shape[0], (1,), generator=g)
            cents.append(sub[j])
            best = torch.minimum(best, _sq_dists(sub, cents[-1])[:, 0])
        c = torch.cat(cents)
        history = []
        for _ in tqdm(range(iterations), desc="k-means", unit="iter", disable=not progress):
            ids, d2 = assign(x, c)
            history.append(float(d2.mean()))
            counts = torch.bincount(ids, minlength=k).float()
            sums = torch.zeros_like(c).index_add_(0, ids, x)
            empty = counts == 0
            c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
            if empty.any():  # re-seed empty clusters at the worst-served points
                far = d2.topk(int(empty.sum())).indices
                c[empty] = x[far]
        ids, d2 = assign(x, c)
        stats = {"inertia": float(d2.mean()), "inertia_history": history,
                 "usage": float((torch.bincount(ids, minlength=k) > 0).float().mean())}
        return cls(c), stats


def code_stats(ids: torch.Tensor, size: int) -> dict:
    """Usage (fraction of codes used) and perplexity (exp of the code entropy)."""
    counts = torch.bincount(ids.flatten(), minlength=size).float()
    p = counts / counts.sum().clamp_min(1)
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).float().mean()), "perplexity": float(ent.exp())}
